"""Model adapters: what lorakit needs from a Stable Diffusion model, for the WebUI's ldm/sgm objects and diffusers."""
