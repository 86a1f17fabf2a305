"""Reading and writing network files in the kohya safetensors format."""
