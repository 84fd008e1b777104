"""UFO: Unified Feature Optimization. One multi-task ViT supernet; exact subnets for every task and device."""

import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("ufo-vision")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from ufo.arch import Arch, SearchSpace
from ufo.errors import UFOError

__all__ = ["Arch", "SearchSpace", "UFOError", "__version__", "load"]


def __getattr__(name: str) -> Any:
    """`ufo.load` imports torch and the model code only when first used: `import ufo` stays light."""
    if name == "load":
        from ufo.deploy.hf import load

        return load
    raise AttributeError(f"module 'ufo' has no attribute {name!r}")


if "timm" in sys.modules:  # register timm's `ufo_vit` now; importing timm here would cost seconds
    import_module("ufo.nn.timm_vit")
