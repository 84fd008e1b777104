"""Optional dependencies. The core install trains, evaluates and extracts; serving, ONNX export and
the subnet search each need an extra: `pip install 'ufo-vision[serve]'`, `[export]`, `[search]`,
or `[all]` for the three. Every import of an optional package goes through `require`, which
raises a `MissingExtra` naming the extra to install instead of a bare ModuleNotFoundError."""

from __future__ import annotations

import importlib
from types import ModuleType

from ufo.errors import UFOError

# extra -> (what needs it, the top-level modules of its packages); pyproject.toml lists the packages
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "serve": ("ufo serve", ("fastapi", "uvicorn", "python_multipart", "prometheus_client")),
    "export": ("ONNX export", ("onnx", "onnxruntime", "onnxscript")),
    "search": ("the subnet search", ("optuna",)),
}
# module -> its extra; starlette comes with fastapi, multipart is python-multipart's old module name
EXTRA_OF: dict[str, str] = {m: e for e, (_, mods) in EXTRAS.items() for m in mods} | {
    "starlette": "serve",
    "multipart": "serve",
}


class MissingExtra(UFOError):
    """An optional package that is not installed; the message names the extra that installs it."""


def missing_extra(e: BaseException) -> MissingExtra | None:
    """The MissingExtra an import error stands for, when the missing module belongs to an extra
    (None for any other error: a core package missing, or an optional one failing inside)."""
    top = (getattr(e, "name", None) or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else ""
    extra = EXTRA_OF.get(top)
    if extra is None:
        return None
    return MissingExtra(
        f"{EXTRAS[extra][0]} needs the optional package {top!r}, which is not installed: "
        f"pip install 'ufo-vision[{extra}]' (or 'ufo-vision[all]')"
    )


def require(module: str) -> ModuleType:
    """`importlib.import_module(module)`, or a MissingExtra naming the extra when its package is missing."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        extra = missing_extra(e)
        if extra is None:
            raise
        raise extra from None


def require_extra(extra: str) -> None:
    """Import every package of `extra`, so that a feature fails up front with the install line."""
    for module in EXTRAS[extra][1]:
        require(module)
