"""The AUTOMATIC1111 WebUI adapter: the only package that imports ``modules.*``."""
