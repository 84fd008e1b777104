"""Add a task to a trained run with few labels (`ufo extend`), leaving its other tasks exactly as they were.

The new task joins the supernet as one more task: in every block a task expert initialised from
the shared expert, a router-logits row (and mix row) that picks its path, and a fresh head of its
kind. Its path is `task` in every block (`shared` when only the head trains). What trains is chosen
by `train`:

- `head`: the head alone, on the shared branch (attention, shared FFN, norms) as it is;
- `head+expert` (default): also the task's own FFN expert in every block;
- `head+expert+norms`: also task-specific LayerNorm affines where the new task's path is its own:
  the norm before its expert in every block and the final norm before its head. They start equal
  to the shared ones and are folded into the expert's fc1 and into the head after training, so the
  saved model has the usual structure. The norm before attention stays shared: the attention is
  shared, and a task copy of it would be a new branch, not a norm;
- `all`: the whole shared branch too, for comparison. The other tasks' outputs then change.

In the first three modes no parameter that another task uses receives an update, so every other
task's outputs are bitwise equal before and after; `extend` checks that on a fixed batch and
records it in `extend.json`. `fraction` keeps a deterministic subset of the new task's training
labels (`fraction_subset`). The output folder is an ordinary run folder (model.safetensors with one
more task, config.yaml) for `ufo eval`, `ufo extract`, search, `ufo export` and `ufo serve`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import yaml
from pydantic import Field, ValidationError
from torch import nn

from ufo.arch import PATHS, Arch
from ufo.checkpoint import atomic_write_text
from ufo.config import Config, TaskConfig, parse_config
from ufo.data.build import build_task_data
from ufo.errors import ConfigError
from ufo.evaluation.protocol import evaluate_tasks
from ufo.model import UFOModel, build_model, save_model
from ufo.nn.mlp import ElasticMlp
from ufo.runlock import locks
from ufo.taskmodel import load_trained
from ufo.tasks import TaskData, task_class
from ufo.tasks.base import EmbeddingTask
from ufo.train import distributed as dist
from ufo.train.optim import build_optimizer
from ufo.train.tune import TuneError, TuneLoop, TuneRecipe

Mode = Literal["head", "head+expert", "head+expert+norms", "all"]
MODES: tuple[str, ...] = ("head", "head+expert", "head+expert+norms", "all")
EXACT_MODES = ("head", "head+expert", "head+expert+norms")  # the others' outputs stay bitwise equal


class ExtendConfig(TuneRecipe):
    """What trains, on how much data, and the optimisation recipe (TuneRecipe's defaults)."""

    train: Mode = "head+expert"
    fraction: float = Field(1.0, gt=0, le=1)  # share of the new task's training labels


# ----- the new task's config and data -----


def load_task_config(source: str | Path | dict) -> tuple[str, TaskConfig]:
    """(name, TaskConfig) from a YAML file or mapping holding one task: `{NAME: {kind, data, ...}}`
    or `{tasks: {NAME: {...}}}`."""
    where = str(source) if not isinstance(source, dict) else "<task config>"
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"task config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if isinstance(data, dict) and set(data) == {"tasks"}:
        data = data["tasks"]
    if not isinstance(data, dict) or len(data) != 1:
        raise ConfigError(
            f"{where}: expected exactly one task, as `NAME: {{kind: ..., data: ...}}`; "
            f"got {list(data) if isinstance(data, dict) else type(data).__name__}"
        )
    ((name, body),) = data.items()
    try:
        return str(name), TaskConfig.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{where}: tasks.{name}.{loc}: {err['msg']}") from None


def fraction_subset(data: TaskData, fraction: float, seed: int, grouped: bool) -> TaskData:
    """A deterministic share of the training labels. Plain tasks: per class, the first
    max(1, round(fraction * n_c)) samples of a seeded permutation (every class kept). Identity tasks
    (P x K sampling): the first max(2, round(fraction * n_ids)) identities of a seeded permutation,
    with all their images (metric losses need positives), relabelled 0..k-1. For a fixed seed a
    smaller fraction's subset lies inside a larger one's."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"--fraction {fraction}: must be in (0, 1]")
    if fraction == 1:
        return data
    labels = data.train.labels.numpy()
    if grouped:
        ids = np.unique(labels)
        order = np.random.default_rng([seed, 1]).permutation(ids)
        keep_ids = order[: max(2, round(fraction * len(ids)))]
        idx = np.flatnonzero(np.isin(labels, keep_ids))
    else:
        parts = []
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            perm = np.random.default_rng([seed, int(c)]).permutation(members)
            parts.append(perm[: max(1, round(fraction * len(members)))])
        idx = np.sort(np.concatenate(parts))
    train = data.train.subset(idx)
    if grouped:
        train = train.relabel()
    return TaskData(
        train=train,
        eval=data.eval,
        groups=train.labels.clone() if data.groups is not None else None,
        extra=data.extra,
        notes=[*data.notes, f"{fraction:g} of the training labels: {len(train)} samples"],
    )


# ----- building the extended model -----


def with_task(cfg: Config, name: str, tc: TaskConfig) -> Config:
    """`cfg` with task `name` appended (so its own `img_size`, if set, is its input size)."""
    if name in cfg.tasks:
        raise ConfigError(f"task {name!r} is already in the run (tasks: {cfg.task_names}); pick another name")
    data = cfg.model_dump(mode="json")
    data["tasks"][name] = tc.model_dump(mode="json")
    return parse_config(data, f"run config + task {name!r}")


@torch.no_grad()
def add_task(
    model: UFOModel, cfg: Config, arch: Arch, name: str, tc: TaskConfig, num_classes: int, path: str, seed: int = 0
) -> tuple[UFOModel, Config, Arch]:
    """A copy of `model` with task `name` appended: every old tensor copied, the new expert of each
    block a copy of its shared expert, the new router row set to `path`, the new head fresh. The
    new task may have its own input size (`tc.img_size`): the position embedding is resampled per input."""
    new_cfg = with_task(cfg, name, tc)
    if path not in model.space.paths:
        raise ConfigError(f"the run's space allows paths {model.space.paths}; the new task needs {path!r}")
    torch.manual_seed(seed)
    classes = {n: model.head(n).num_classes for n in model.tasks} | {name: num_classes}
    new = build_model(new_cfg, classes)
    old_sd, new_sd = model.state_dict(), new.state_dict()
    T = len(model.tasks)
    for k, v in old_sd.items():
        if k.endswith(("router_logits", "mix_logits")):
            new_sd[k][:T] = v
        else:
            new_sd[k].copy_(v)
    old_blocks = model.backbone.super_blocks()
    for i, blk in enumerate(new.backbone.super_blocks()):
        blk.mlp.experts[name].load_state_dict(old_blocks[i].mlp.shared.state_dict())
        row = torch.zeros(len(PATHS))
        row[PATHS.index(path)] = 1.0
        new_sd[f"backbone.blocks.{i}.mlp.router_logits"][T] = row
        new_sd[f"backbone.blocks.{i}.mlp.mix_logits"][T] = 0.0
    # state_dict() tensors share the parameters' storage: the copies above wrote into `new`
    new_arch = arch.model_copy(update={"paths": {**arch.paths, name: [path] * arch.depth}})
    new.set_arch(new_arch)
    return new, new_cfg, new_arch


class NormedExpert(nn.Module):
    """x -> expert(gain * x + shift): a task-specific affine on the shared norm's output before the
    task's expert, i.e. a task LayerNorm whose affine starts at the shared one (gain 1, shift 0)."""

    def __init__(self, expert: ElasticMlp, dim: int) -> None:
        super().__init__()
        self.expert = expert
        self.gain = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def set_active(self, dim: int, hidden: int) -> None:
        self.expert.set_active(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = x.shape[-1]
        return self.expert(x * self.gain[:e] + self.shift[:e])


@torch.no_grad()
def fold_affine(linear: nn.Linear, gain: torch.Tensor, shift: torch.Tensor, bn: nn.BatchNorm1d | None = None) -> None:
    """Fold x -> gain * x + shift (on the first len(gain) inputs) into `linear`: W' = W diag(gain),
    and W shift moves into the bias, or, for a bias-free layer before BatchNorm, into its running mean."""
    e = gain.numel()
    const = linear.weight[:, :e] @ shift
    linear.weight[:, :e] *= gain
    if linear.bias is not None:
        linear.bias.add_(const)
    elif bn is not None:
        cast(torch.Tensor, bn.running_mean).sub_(const)  # BatchNorm1d tracks running stats by default
    elif bool(const.abs().max() > 0):
        raise TuneError("cannot fold a norm shift into a bias-free layer without a BatchNorm after it")


class ExtendStep(nn.Module):
    """The module that trains: the extended model, plus the final-norm affine of `norms` mode."""

    def __init__(self, model: UFOModel, task: str, norms: bool) -> None:
        super().__init__()
        self.model, self.task = model, task
        e = model.arch.embed_dim
        self.gain = nn.Parameter(torch.ones(e)) if norms else None
        self.shift = nn.Parameter(torch.zeros(e)) if norms else None
        self.design_flags: dict[str, bool] = {}  # requires_grad as built (a BN-neck bias is frozen by design)
        if norms:
            for blk in model.backbone.super_blocks():
                expert = cast(ElasticMlp, blk.mlp.experts[task])
                blk.mlp.experts[task] = NormedExpert(expert, model.space.max_embed_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.backbone(x, self.task)
        return f if self.gain is None else f * self.gain + self.shift

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.task: self.model.head(self.task).loss(self.features(x), y)}

    @torch.no_grad()
    def fold(self) -> UFOModel:
        """Fold the norm affines into the expert fc1s and the head; returns the plain model."""
        gain, shift = self.gain, self.shift
        if gain is None or shift is None:
            return self.model
        e = self.model.arch.embed_dim
        for blk in self.model.backbone.super_blocks():
            w = cast(NormedExpert, blk.mlp.experts[self.task])
            fold_affine(w.expert.fc1, w.gain[:e], w.shift[:e])
            blk.mlp.experts[self.task] = w.expert
        head = self.model.head(self.task)
        linear = getattr(head, "head", None)
        if isinstance(head, EmbeddingTask):
            fold_affine(head.neck, gain, shift, head.bn)
        elif isinstance(linear, nn.Linear):
            fold_affine(linear, gain, shift)
        else:
            raise TuneError(f"train 'head+expert+norms': cannot fold the final norm into a {head.kind!r} head")
        self.gain = self.shift = None
        self.model.set_arch(self.model.arch)
        return self.model


def select_trainable(step: ExtendStep, mode: str) -> list[nn.Parameter]:
    """Mark what `mode` trains (requires_grad) and freeze the rest; returns the trainable parameters.
    Parameters frozen by design (a BN-neck's bias) stay frozen."""
    model, task = step.model, step.task
    old_tasks = [t for t in model.tasks if t != task]
    keep = []
    for n, p in step.named_parameters():
        if n.startswith(f"model.heads.{task}."):
            chosen = True
        elif f".mlp.experts.{task}." in n:
            chosen = mode != "head"
        elif n in ("gain", "shift"):
            chosen = True
        elif mode == "all":
            chosen = not (
                n.startswith("model.heads.")
                or n.endswith(("router_logits", "mix_logits"))
                or any(f".mlp.experts.{t}." in n for t in old_tasks)
            )
        else:
            chosen = False
        was = step.design_flags.setdefault(n, p.requires_grad)
        p.requires_grad_(chosen and was)
        if chosen and was:
            keep.append(p)
    return keep


# ----- the run -----


def probe_outputs(model: UFOModel, tasks: list[str], seed: int = 1234, n: int = 8) -> dict[str, torch.Tensor]:
    """Each task's eval outputs on a fixed random batch at its input size (for the bitwise-unchanged check)."""
    s = model.space

    def probe(task: str) -> torch.Tensor:
        return torch.randn(n, s.in_chans, *s.input_size(task), generator=torch.Generator().manual_seed(seed))

    was = model.training
    model.eval()
    with torch.inference_mode():
        out = {t: model(probe(t), t).clone() for t in tasks}
    model.train(was)
    return out


@locks("out")
def extend(
    run_dir: str | Path,
    task_config: str | Path | dict,
    out: str | Path,
    cfg: ExtendConfig | None = None,
    data_root: str | None = None,
    resume: bool = False,
    show_progress: bool = True,
    data: TaskData | None = None,
) -> dict[str, Any]:
    """Add the task of `task_config` to the run `run_dir` and train it as `cfg` says; writes the
    extended run to `out` (model.safetensors, config.yaml, extend.json, logs). Returns the report."""
    cfg = cfg or ExtendConfig()
    out = Path(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    name, tc = load_task_config(task_config)
    old, run_cfg, manifest = load_trained(run_dir)
    if data_root is not None:
        run_cfg.data_root = data_root
    arch = Arch.model_validate(manifest["arch"])
    full = data if data is not None else build_task_data(name, tc, with_task(run_cfg, name, tc))
    grouped = task_class(tc.kind).uses_groups
    sub = fraction_subset(full, cfg.fraction, cfg.seed, grouped)
    path = "shared" if cfg.train == "head" else "task"
    model, new_cfg, new_arch = add_task(old, run_cfg, arch, name, tc, len(sub.train.class_names), path, cfg.seed)
    before = probe_outputs(old, old.tasks)
    del old

    step = ExtendStep(model, name, cfg.train == "head+expert+norms")
    # trained on the GPU when there is one (probed and saved on the CPU): the step moves as a whole, so
    # the norm affines it has just created join the model there, before the optimiser is built
    step.to(dist.device(cfg.device))
    params = select_trainable(step, cfg.train)
    tcfg = new_cfg.model_copy(update={"train": cfg.train_config(run_cfg.train.eval_batch_size)})
    optimizer = build_optimizer(_GroupView(step), tcfg)
    recipe = {
        "run": str(Path(run_dir).resolve()),
        "task": name,
        "task_config": tc.model_dump(mode="json"),
        **cfg.model_dump(mode="json"),
    }
    loop = TuneLoop(
        step,
        optimizer,
        step,
        tcfg,
        name,
        sub,
        out,
        recipe,
        loss_names=[name],
        seed=cfg.seed,
        k=int(getattr(model.heads[name].opts, "k", 4)),
        show_progress=show_progress,
    )
    t0 = time.perf_counter()
    summary = loop.fit(resume, description=f"extend +{name} ({cfg.train}, {cfg.fraction:g})")
    seconds = time.perf_counter() - t0
    for n, p in step.named_parameters():
        p.requires_grad_(step.design_flags.get(n, True))
    model = step.fold().eval().cpu()

    after = probe_outputs(model, list(before))
    unchanged = {t: bool(torch.equal(before[t], after[t])) for t in before}
    if cfg.train in EXACT_MODES and not all(unchanged.values()):
        raise TuneError(
            f"extension changed the outputs of tasks {[t for t, u in unchanged.items() if not u]}; "
            f"this is a bug (mode {cfg.train!r} trains only the new task's own parameters)"
        )
    extra = {
        "extended": {
            "from": str(run_dir),
            "task": name,
            "train": cfg.train,
            "fraction": cfg.fraction,
            "train_samples": len(sub.train),
            "steps": summary["steps"],
        }
    }
    save_model(out / "model.safetensors", model, new_cfg, new_arch, extra)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(new_cfg.model_dump(mode="json"), sort_keys=False))
    metrics = evaluate_tasks(model, {name: full}, new_cfg, [name])[name]
    report = {
        "task": name,
        "kind": tc.kind,
        "primary": task_class(tc.kind).primary,
        "train": cfg.train,
        "fraction": cfg.fraction,
        "train_samples": len(sub.train),
        "full_train_samples": len(full.train),
        "trainable_params": sum(p.numel() for p in params),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "others_unchanged": unchanged,
        "steps": summary["steps"],
        "train_seconds": seconds,
        "run": str(out),
        "source": str(run_dir),
        "recipe": cfg.model_dump(mode="json"),
    }
    atomic_write_text(out / "extend.json", json.dumps(report, indent=2))
    return report


class _GroupView(nn.Module):
    """`build_optimizer` over the trainable parameters only, with the model's names (heads.<task>...)
    so that per-task LR scales and the margin-loss group apply."""

    def __init__(self, step: ExtendStep) -> None:
        super().__init__()
        self.inner = step

    @property
    def heads(self) -> nn.ModuleDict:
        return self.inner.model.heads

    def named_parameters(self, *args, **kwargs):
        for n, p in self.inner.named_parameters():
            if p.requires_grad:
                yield (n.removeprefix("model."), p)


__all__ = [
    "EXACT_MODES",
    "MODES",
    "ExtendConfig",
    "add_task",
    "extend",
    "fold_affine",
    "fraction_subset",
    "load_task_config",
    "probe_outputs",
    "select_trainable",
    "with_task",
]
