"""UFO: Unified Feature Optimization. One multi-task ViT supernet; exact subnets for every task and device."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ufo-vision")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from ufo.arch import Arch, SearchSpace  # noqa: E402
from ufo.errors import UFOError  # noqa: E402

__all__ = ["Arch", "SearchSpace", "UFOError", "__version__"]
