"""Slider LoRAs from before/after image pairs: the copier, difference and paired methods, and their quality report."""
