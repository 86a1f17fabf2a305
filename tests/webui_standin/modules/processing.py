"""Stand-in of ``modules.processing``: txt2img returns one flat-colour image per call whose red channel is
255 * (sum of the prompt's ``<lora:name:w>`` weights) clipped to [0, 1], so tests can see which weights arrived."""

import re

from PIL import Image

LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]+)(?::[^>]*)?>")


class Processed:
    def __init__(self, images, seed, info=""):
        self.images = images
        self.seed = seed
        self.info = info


class StableDiffusionProcessingTxt2Img:
    def __init__(self, sd_model=None, prompt="", negative_prompt="", seed=-1, steps=20, width=512, height=512,
                 cfg_scale=7.0, sampler_name=None, do_not_save_samples=False, do_not_save_grid=False, **kwargs):
        self.sd_model = sd_model
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.steps = steps
        self.width = width
        self.height = height
        self.cfg_scale = cfg_scale
        self.sampler_name = sampler_name

    def close(self):
        pass


def process_images(p):
    weight = sum(float(w) for _, w in LORA_TAG.findall(p.prompt))
    red = int(255 * min(max(weight, 0.0), 1.0))
    return Processed([Image.new("RGB", (p.width, p.height), (red, 0, 0))], p.seed, p.prompt)
