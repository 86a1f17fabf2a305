"""lorakit: train, derive and merge LoRA / LoCon / LoHa networks for Stable Diffusion.

The package is a host-agnostic core (``models``, ``networks``, ``formats``, ``train``, ``merge``, ``toy``)
plus one adapter for the AUTOMATIC1111 WebUI (``webui``), the only place that imports ``modules.*``.
"""

__version__ = "0.1.0"
