"""Stand-in of ``modules.devices``."""

import torch

device = torch.device("cpu")
cpu = torch.device("cpu")
fp8 = False


def torch_gc():
    pass
