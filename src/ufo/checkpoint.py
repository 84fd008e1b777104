"""The one checkpoint format: a safetensors file whose header carries a JSON manifest.

Weights are safetensors (loading runs no code from the file: no pickle anywhere). The manifest
(format, versions, kind, search space, tasks, arch, router state, config, ...) is stored as JSON
under the `ufo.manifest` metadata key, so weights and manifest live in one file and are written
by one atomic rename: temp file in the same folder, fsync, rename, fsync of the folder. A crash
mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ufo
from ufo.arch import Arch, SearchSpace
from ufo.errors import CheckpointError, StorageError

if TYPE_CHECKING:
    from ufo.nn.vit import SuperViT

FORMAT = "ufo-checkpoint"
FORMAT_VERSION = 1
MANIFEST_KEY = "ufo.manifest"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_errno(e: BaseException) -> int | None:
    """The errno of an OSError, or of the "(os error N)" that safetensors' own error type quotes."""
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"\(os error (\d+)\)", str(e)) if isinstance(e, safetensors.SafetensorError) else None
    return int(m.group(1)) if m else None


def _storage_error(path: Path, e: BaseException) -> StorageError:
    n = _os_errno(e)
    reason = getattr(e, "strerror", None) or (os.strerror(n) if n is not None else str(e))
    return StorageError(f"cannot write {path}: {reason}")


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp_path)`, fsync the file, then rename it over `path` (atomic on POSIX).

    A failure (disk full, permission denied, ...) removes the temp file, leaves any previous
    `path` as it was, and raises StorageError naming `path` and the system's reason."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _storage_error(path, e) from e
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) or _os_errno(e) is not None:
            raise _storage_error(path, e) from e
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        # numpy's stubs give ndarray a __buffer__ only for Python >= 3.12
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # type: ignore[arg-type]
    return h.hexdigest()


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    """Write `tensors` and `manifest` to one safetensors file, atomically; the manifest carries the
    weights' SHA-256 (`weights_sha256`), which loading checks."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "ufo_version": ufo.__version__,
        "torch_version": torch.__version__,
        **manifest,
        "weights_sha256": weights_digest(tensors),
    }
    metadata = {MANIFEST_KEY: json.dumps(header)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def check_not_run_folder(path: str | Path) -> None:
    """A CheckpointError saying where the models are when `path` (a folder, or its missing
    model.safetensors) is a `ufo run` folder, given where a model or a `ufo train` run is expected."""
    from ufo.run.pipeline import run_folder_hint  # lazily: ufo.run imports this module

    hint = run_folder_hint(path)
    if hint:
        raise CheckpointError(f"checkpoint not found: {path}; {hint}")


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint, without loading its weights."""
    path = Path(path)
    if not path.is_file():
        check_not_run_folder(path)
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint: {e}") from e
    if MANIFEST_KEY not in meta:
        raise CheckpointError(f"{path} has no UFO manifest (metadata key {MANIFEST_KEY!r}); is it a UFO checkpoint?")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: the manifest is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path}: the manifest is a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: manifest format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: manifest format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {manifest['format_version']} is newer than this UFO "
            f"({FORMAT_VERSION}); upgrade ufo to read it"
        )
    return manifest


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, manifest) of a checkpoint. Corrupt files give a CheckpointError naming the file."""
    manifest = read_manifest(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: the weights cannot be read (truncated or corrupt file?): {e}") from e
    want = manifest.get("weights_sha256")  # files written before the checksum have none
    if want is not None and weights_digest(tensors) != want:
        raise CheckpointError(f"{path}: the weights do not match the manifest's checksum (corrupt or altered bytes)")
    return tensors, manifest


def load_state_checked(
    module: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path, prefix: str = ""
) -> None:
    """Load `tensors[prefix + name]` into `module`, failing with a message that lists every
    missing, unexpected or wrongly shaped tensor rather than torch's traceback."""
    state = module.state_dict()
    theirs = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    missing = sorted(set(state) - set(theirs))
    unexpected = sorted(set(theirs) - set(state))
    shapes = [
        f"{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(v.shape)}"
        for k, v in state.items()
        if k in theirs and theirs[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{title}: {', '.join(items[:5])}{more}")
        raise CheckpointError(f"{source} does not match this model; " + "; ".join(parts))
    module.load_state_dict(theirs, strict=True)


# ----- models -----


def save_supernet(path: str | Path, model: SuperViT, extra: dict[str, Any] | None = None) -> None:
    """Save a SuperViT with its search space, task list, router state and routes."""
    manifest = {
        "kind": "supernet",
        "space": model.space.model_dump(),
        "tasks": model.tasks,
        "router": model.router_state(),
        "routes": model.routes(),
        **(extra or {}),
    }
    save_checkpoint(path, model.state_dict(), manifest)


def load_supernet(path: str | Path, space: SearchSpace | None = None) -> SuperViT:
    """Build a SuperViT from a checkpoint's manifest and load its weights. With `space`, the
    checkpoint must have been saved from that same space (tasks included)."""
    from ufo.nn.vit import SuperViT

    tensors, manifest = load_checkpoint(path)
    if manifest.get("kind") != "supernet":
        raise CheckpointError(f"{path} holds a {manifest.get('kind')!r} model, not a supernet")
    saved = SearchSpace.model_validate(manifest["space"])
    if space is not None and saved != space:
        diff = [k for k in SearchSpace.model_fields if getattr(saved, k) != getattr(space, k)]
        raise CheckpointError(
            f"{path} was saved for another search space; differing fields: "
            + ", ".join(f"{k} (checkpoint {getattr(saved, k)} vs model {getattr(space, k)})" for k in diff)
        )
    model = SuperViT(saved)
    load_state_checked(model, tensors, path)
    return model


def save_extracted(path: str | Path, model: nn.Module, space: SearchSpace, extra: dict[str, Any] | None = None) -> None:
    """Save a model returned by `ufo.nn.extract` (it carries `ufo_arch` and `ufo_tasks`)."""
    arch, tasks = getattr(model, "ufo_arch", None), getattr(model, "ufo_tasks", None)
    if arch is None or tasks is None:
        raise CheckpointError("model has no ufo_arch/ufo_tasks: save_extracted takes the output of ufo.nn.extract")
    manifest = {
        "kind": "vit" if len(tasks) == 1 else "multitask_vit",
        "space": space.model_dump(),
        "arch": arch.model_dump(),
        "tasks": list(tasks),
        "num_params": space.num_params(arch, tasks),
        **(extra or {}),
    }
    save_checkpoint(path, model.state_dict(), manifest)


def load_extracted(path: str | Path) -> nn.Module:
    """Rebuild a standalone extracted model (plain timm/torch layers) and load its weights."""
    from ufo.nn.extract import build_extracted, mark_extracted

    tensors, manifest = load_checkpoint(path)
    if manifest.get("kind") not in ("vit", "multitask_vit"):
        raise CheckpointError(f"{path} holds a {manifest.get('kind')!r} model, not an extracted subnet")
    space = SearchSpace.model_validate(manifest["space"])
    arch = Arch.model_validate(manifest["arch"])
    model = build_extracted(space, arch, manifest["tasks"])
    load_state_checked(model, tensors, path)
    mark_extracted(model, arch, list(manifest["tasks"]))
    return model.eval()
