"""Building a UFOModel from a config, and saving/loading trained models (`kind: ufo_model`).

A trained model file holds the backbone and every head; its manifest carries the config, the
search space, each head's kind and class count, the training arch, routes and router state, so
loading needs no data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ufo.arch import Arch, SearchSpace
from ufo.checkpoint import load_checkpoint, load_state_checked, save_checkpoint
from ufo.config import Config, parse_config
from ufo.errors import CheckpointError
from ufo.model import UFOModel
from ufo.tasks import task_class


def build_model(cfg: Config, num_classes: dict[str, int]) -> UFOModel:
    space = cfg.space()
    heads = {n: task_class(t.kind)(n, t.options, num_classes[n], space.max_embed_dim) for n, t in cfg.tasks.items()}
    return UFOModel(space, heads, cfg.model.drop_path_rate)


def arch_from_spec(spec: str, space: SearchSpace, routes: dict | None = None) -> Arch:
    """`largest`, `smallest`, `random:SEED` or a path to an arch JSON file."""
    from ufo.errors import ArchError

    if spec == "largest":
        return space.largest(routes)
    if spec == "smallest":
        return space.smallest(routes)
    if spec.startswith("random:"):
        try:
            return space.sample(int(spec.split(":", 1)[1]), routes)
        except ValueError:
            raise ArchError(f"arch {spec!r}: expected random:SEED with an integer seed") from None
    arch = Arch.load(spec)
    space.check(arch)
    return arch


def resolve_train_arch(cfg: Config, space: SearchSpace) -> Arch:
    """The fixed arch of All-in-One training, with `train.paths` for every task (None: the router)."""
    arch = arch_from_spec(cfg.train.arch or "largest", space)
    p = cfg.train.paths
    return arch.model_copy(update={"paths": {} if p is None else {t: [p] * arch.depth for t in space.tasks}})


def save_model(path: str | Path, model: UFOModel, cfg: Config, arch: Arch, extra: dict[str, Any] | None = None) -> None:
    heads = {n: {"kind": h.kind, "num_classes": h.num_classes} for n, h in model.heads.items()}
    manifest = {
        "kind": "ufo_model",
        "config": cfg.model_dump(mode="json"),
        "space": model.space.model_dump(),
        "tasks": model.tasks,
        "heads": heads,
        "arch": arch.model_dump(),
        "routes": model.backbone.routes(),
        "router": model.backbone.router_state(),
        **(extra or {}),
    }
    save_checkpoint(path, model.state_dict(), manifest)


def load_model(path: str | Path) -> tuple[UFOModel, Config, dict[str, Any]]:
    """(model in eval mode at its training arch, config, manifest) of a trained model file."""
    tensors, manifest = load_checkpoint(path)
    if manifest.get("kind") != "ufo_model":
        raise CheckpointError(f"{path} holds a {manifest.get('kind')!r} checkpoint, not a trained UFO model")
    cfg = parse_config(manifest["config"], str(path))
    model = build_model(cfg, {n: h["num_classes"] for n, h in manifest["heads"].items()})
    load_state_checked(model, tensors, path)
    model.set_arch(Arch.model_validate(manifest["arch"]))
    return model.eval(), cfg, manifest
