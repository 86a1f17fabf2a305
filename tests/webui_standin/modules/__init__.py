"""Stand-in of the AUTOMATIC1111 WebUI's ``modules`` package (see ../README.md)."""
