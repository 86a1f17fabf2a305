"""Let PyPI's torchvision (a CUDA build) import beside the CPU torch in the test environment.

The real ``ldm`` package imports ``torchvision.utils.make_grid``. PyPI's torchvision ships a CUDA ``_C.so`` that
cannot load next to torch's CPU wheel, and then ``torchvision._meta_registrations`` fails on the missing
``torchvision::nms`` / ``qnms`` operators. This hook defines their schemas just before torchvision is first imported
(nothing else of torchvision's C++ ops is used here). Installed into the dev venv by ``dev/setup-env.sh`` with a
``.pth`` line; never part of the extension.
"""

import importlib.abc
import sys


class _DefineTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if not hasattr(torch.ops.torchvision, "nms"):
            library = torch.library.Library("torchvision", "DEF")
            library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _DefineTorchvisionOps.library = library  # keep the definitions alive
        return None


sys.meta_path.insert(0, _DefineTorchvisionOps())
