"""Standalone task models: an extracted backbone plus its task heads, in one safetensors file.

`extract_task_model(model, arch, tasks, cfg)` cuts a trained `UFOModel` down to `tasks` at `arch`:
the backbone through `ufo.nn.extract` (a timm ViT for one task, a `MultiTaskViT` for several) and
each head sliced to the arch's embed_dim as plain `nn.Linear` / `nn.BatchNorm1d` layers. Its
outputs equal the UFOModel's at that arch. The file (`kind: task_model`) carries everything a
deployment needs without the training code's data: per-task head kind, output kind, class names,
the verification threshold (calibrated on held-out pairs when the data is at hand), and the
preprocessing (input size, channels, mean, std).

Input sizes: a one-task model's `preprocessing.img_size` is its task's size (one side when square,
else [height, width]). A multi-task model keeps the base size there and lists the tasks whose input
differs in `preprocessing.task_img_size` (written only when some task differs, so single-size
manifests look as they always did); `Preprocessing.for_task(task)` is one task's preprocessing.

A task model's backbone is either that extracted ViT or, for a distilled student (`ufo distill`),
any timm model named in `info.backbone` (`TimmBackbone`: name, kwargs, feature width), rebuilt
with `pretrained=False` on load. A student's `arch`/`space` are its teacher's (where it came from).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator
from torch import nn

from ufo.arch import Arch, ImageSize, SearchSpace, as_hw, check_task_name
from ufo.checkpoint import check_not_run_folder, load_checkpoint, load_state_checked, read_manifest, save_checkpoint
from ufo.config import Config, parse_config
from ufo.data.transforms import BatchTransform, build_transform
from ufo.errors import CheckpointError, DataError, UFOError
from ufo.model import UFOModel, arch_from_spec, load_model
from ufo.nn.elastic import bias_of
from ufo.nn.extract import build_extracted, extract, mark_extracted, resolve_arch
from ufo.nn.timm_vit import make_pretrained_cfg
from ufo.tasks import TaskData
from ufo.tasks.base import EmbeddingTask, Task

KIND = "task_model"


class DeployError(UFOError):
    """A model that cannot be packaged, exported or served as asked."""


MAX_SIDE = 2048  # the largest input side a task model may ask for (decoded pixels per request stay bounded)


def compact_size(size: ImageSize) -> ImageSize:
    """An image size as manifests write it: one int when square, else (height, width)."""
    h, w = as_hw(size)
    return h if h == w else (h, w)


class Preprocessing(BaseModel):
    """What turns an image into model input: decode, resize to `img_size` (one side, or [height,
    width]), `in_chans` channels, scale to [0, 1], normalise with per-channel `mean` and `std`.
    `task_img_size` gives the (height, width) of the tasks of a multi-task model whose input size
    differs from `img_size`."""

    model_config = ConfigDict(extra="forbid")

    img_size: ImageSize
    in_chans: int
    mean: list[float]
    std: list[float]
    task_img_size: dict[str, tuple[int, int]] = Field(default_factory=dict)

    @field_validator("img_size")
    @classmethod
    def _compact(cls, v: ImageSize) -> ImageSize:
        return compact_size(v)

    @model_validator(mode="after")
    def _valid(self) -> Preprocessing:
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        for what, vals in (("mean", self.mean), ("std", self.std)):
            if len(vals) not in (1, self.in_chans) or not all(math.isfinite(v) for v in vals):
                raise ValueError(f"{what} {vals}: expected 1 or {self.in_chans} finite values")
        if min(self.std) <= 0:
            raise ValueError(f"std {self.std} must be positive (it divides the pixels)")
        for where, size in (
            ("img_size", self.img_size),
            *((f"task_img_size[{t!r}]", v) for t, v in self.task_img_size.items()),
        ):
            h, w = as_hw(size)
            if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
                raise ValueError(f"{where} {h}x{w} (HxW) is outside 1..{MAX_SIDE} pixels a side")
        return self

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler):  # no return annotation: it would replace the schema with a plain dict's
        """Write `task_img_size` only when some task differs: single-size manifests keep their old format."""
        out = handler(self)
        if not self.task_img_size:
            out.pop("task_img_size", None)
        return out

    @classmethod
    def from_config(cls, cfg: Config, tasks: Sequence[str] = ()) -> Preprocessing:
        """The preprocessing of a model of `tasks`: one task's own size, or the base size plus the
        sizes of the tasks that differ from it."""
        m = cfg.model
        tf = build_transform(m.img_size, m.mean, m.std, train=False, in_chans=m.in_chans)
        base: ImageSize = cfg.input_size(tasks[0]) if len(tasks) == 1 else m.img_size
        sizes = {} if len(tasks) == 1 else {t: cfg.input_size(t) for t in tasks if cfg.input_size(t) != as_hw(base)}
        return cls(
            img_size=base,
            in_chans=m.in_chans,
            mean=list(tf.normalize.mean),
            std=list(tf.normalize.std),
            task_img_size=sizes,
        )

    def input_size(self, task: str | None = None) -> tuple[int, int]:
        """(height, width) of `task`'s input (None: `img_size`)."""
        return as_hw(self.task_img_size.get(task, self.img_size) if task is not None else self.img_size)

    def for_task(self, task: str) -> Preprocessing:
        """`task`'s preprocessing alone (its input size as `img_size`)."""
        return Preprocessing(img_size=self.input_size(task), in_chans=self.in_chans, mean=self.mean, std=self.std)

    def transform(self, task: str | None = None) -> BatchTransform:
        """The library's eval transform: uint8 (.., C, H, W) -> normalised float32 model input of `task`."""
        return build_transform(self.input_size(task), self.mean, self.std, train=False, in_chans=self.in_chans)


class HeadInfo(BaseModel):
    """One task's head as deployed: what it outputs and how to read it."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    output: Literal["logits", "embedding"]
    num_classes: int
    embedding_dim: int | None = None
    class_names: list[str] | None = None
    threshold: float | None = None  # cosine similarity above which two images are "same"
    calibration: dict[str, float] | None = None  # how the threshold was fitted (10-fold accuracy, pairs)
    primary: str = ""
    options: dict[str, Any] = {}

    @model_validator(mode="after")
    def _consistent(self) -> HeadInfo:
        if self.num_classes < (1 if self.output == "logits" else 0):
            raise ValueError(f"num_classes of a logits head must be at least 1, got {self.num_classes}")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for num_classes {self.num_classes}")
        if self.embedding_dim is not None and self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {self.embedding_dim}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} is not a cosine similarity in [-1, 1]")
        return self


class TimmBackbone(BaseModel):
    """A timm backbone in place of the extracted ViT: `timm.create_model(name, pretrained=False,
    num_classes=0, in_chans=..., **kwargs)`, whose pooled features (width `num_features`) feed the heads."""

    model_config = ConfigDict(extra="forbid")

    name: str
    kwargs: dict[str, Any] = {}
    num_features: int
    distilled_from: dict[str, Any] | None = None  # teacher source, task, arch, params and metrics


def build_timm_backbone(spec: TimmBackbone, in_chans: int) -> nn.Module:
    """The feature extractor `spec` names (random weights; nothing is downloaded)."""
    import timm

    try:
        model = timm.create_model(spec.name, pretrained=False, num_classes=0, in_chans=in_chans, **spec.kwargs)
    except Exception as e:  # unknown name, bad kwargs: timm's own messages vary
        raise DeployError(
            f"timm model {spec.name!r} with kwargs {spec.kwargs} cannot be built: {type(e).__name__}: {e}"
        ) from None
    if model.num_features != spec.num_features:
        raise DeployError(
            f"timm model {spec.name!r} has {model.num_features} features, the file says {spec.num_features}"
        )
    return model


class TaskModelInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str]
    arch: Arch
    space: SearchSpace
    heads: dict[str, HeadInfo]
    preprocessing: Preprocessing
    config: dict[str, Any] | None = None  # the training config, so data and protocols can be found again
    source: str | None = None
    backbone: TimmBackbone | None = None  # None: the extracted ViT of `arch`; else a timm model (a student)

    @model_validator(mode="after")
    def _consistent(self) -> TaskModelInfo:
        for t in self.tasks:
            check_task_name(t)
        if not self.tasks or set(self.heads) != set(self.tasks):
            raise ValueError(f"tasks {self.tasks} and heads {sorted(self.heads)} must name the same tasks")
        unknown = [t for t in self.tasks if t not in self.space.tasks]
        if unknown:
            raise ValueError(f"tasks {unknown} are not in the space's tasks {self.space.tasks}")
        if self.backbone is None:  # the extracted ViT's position embedding fixes each task's input size
            for t in self.tasks:
                want, got = self.space.input_size(t), self.preprocessing.input_size(t if len(self.tasks) > 1 else None)
                if want != got:
                    raise ValueError(
                        f"preprocessing input size of task {t!r} is {got[0]}x{got[1]} but the model "
                        f"was built for {want[0]}x{want[1]} (HxW)"
                    )
        return self

    @property
    def feature_dim(self) -> int:
        """Width of the backbone features the heads take."""
        return self.arch.embed_dim if self.backbone is None else self.backbone.num_features


class LinearHead(nn.Module):
    """Classification head: logits = Linear(features)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


class EmbeddingHead(nn.Module):
    """BN-neck identity head: L2-normalised BatchNorm(Linear(features)), as `EmbeddingTask`."""

    def __init__(self, dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.neck = nn.Linear(dim, embedding_dim, bias=False)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.bn(self.neck(features)), dim=-1)


def build_head(info: HeadInfo, dim: int) -> nn.Module:
    if info.output == "embedding":
        return EmbeddingHead(dim, info.embedding_dim or 0)
    return LinearHead(dim, info.num_classes)


@torch.no_grad()
def slice_head(head: Task, dim: int) -> tuple[nn.Module, HeadInfo]:
    """A plain copy of `head`'s eval path for backbone features of width `dim`."""
    info = HeadInfo(
        kind=head.kind,
        output=head.output,
        num_classes=head.num_classes,
        primary=head.primary,
        options=head.opts.model_dump(mode="json"),
    )
    out: EmbeddingHead | LinearHead
    if isinstance(head, EmbeddingTask):
        info.embedding_dim = head.neck.out_features
        out = EmbeddingHead(dim, info.embedding_dim)
        out.neck.weight.copy_(head.neck.weight[:, :dim])
        out.bn.load_state_dict(head.bn.state_dict())
    elif head.output == "logits" and isinstance(linear := getattr(head, "head", None), nn.Linear):
        out = LinearHead(dim, head.num_classes)
        out.fc.weight.copy_(linear.weight[:, :dim])
        bias_of(out.fc).copy_(bias_of(linear))
    else:
        raise DeployError(
            f"task {head.name!r} of kind {head.kind!r} has no deployable head: packaging knows "
            "linear classification heads and BN-neck embedding heads"
        )
    return out.eval(), info


class TaskModel(nn.Module):
    """An extracted backbone plus its task heads; `forward(x, task)` runs only that task's path."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module], info: TaskModelInfo) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)
        self.info = info
        self.single = len(info.tasks) == 1
        # what timm.data.resolve_model_data_config reads: this model's real preprocessing, not 224 px ImageNet
        cfg = self.timm_cfg()
        self.pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("first_conv", "classifier")}
        # nn.Module.__setattr__ takes any value; torch types it for tensors and modules only
        backbone.pretrained_cfg = backbone.default_cfg = {  # type: ignore[assignment]
            **getattr(backbone, "pretrained_cfg", {}),
            **cfg,
            "num_classes": 0,
        }

    @property
    def tasks(self) -> list[str]:
        return self.info.tasks

    def timm_cfg(self, task: str | None = None) -> dict[str, Any]:
        """timm's pretrained_cfg of `task`'s input (None: the one task's, or for several tasks the
        base size), with its head's class count (0 for embeddings and several tasks); module names
        (`first_conv`, `classifier`) are the backbone's."""
        info = self.info
        task = task or (info.tasks[0] if self.single else None)
        pre = info.preprocessing
        head = info.heads.get(task) if task is not None else None
        num_classes = head.num_classes if head is not None and head.output == "logits" else 0
        cfg = make_pretrained_cfg(
            pre.input_size(None if self.single else task),
            pre.in_chans,
            pre.mean,
            pre.std,
            num_classes,
            fixed_input_size=self.single,
            stem=info.space.stem,
        )
        if info.backbone is not None:  # a timm student keeps timm's names for its own modules
            cfg.update(architecture=info.backbone.name)
            del cfg["first_conv"], cfg["classifier"]
        elif not self.single:
            cfg.update(architecture=None)
        return cfg

    def check_task(self, task: str) -> None:
        if task not in self.heads:
            raise DeployError(f"unknown task {task!r}; this model serves {self.tasks}")

    def features(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.backbone(x) if self.single else self.backbone(x, task)

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Logits or L2-normalised embedding of images `x` (normalised, (B, C, H, W)) for `task`."""
        self.check_task(task)
        return self.heads[task](self.features(x, task))

    def for_task(self, task: str) -> TaskPath:
        """A one-input module for `task` (what ONNX export traces)."""
        self.check_task(task)
        return TaskPath(self, task)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def predict(self, images: Any, task: str | None = None, k: int = 5, batch_size: int = 32) -> Any:
        """Predictions for PIL images, file paths, uint8 (H, W, C) arrays or uint8 (C, H, W) tensors
        (one, a list, or an (N, C, H, W) tensor): see `ufo.deploy.predict.predict`."""
        from ufo.deploy.predict import predict

        return predict(self, images, task, k, batch_size)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write this model as a Hugging Face-style folder: see `ufo.deploy.hf.save_pretrained`."""
        from ufo.deploy.hf import save_pretrained

        return save_pretrained(self, path)


class TaskPath(nn.Module):
    """`TaskModel` bound to one task: forward(x) -> that task's output."""

    def __init__(self, model: TaskModel, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, self.task)


# ----- building from a trained run -----


def model_file(path: str | Path) -> Path:
    """A run folder's `model.safetensors`, or the file itself; for a `ufo run` folder, an error
    that says where its models are."""
    path = Path(path)
    check_not_run_folder(path)
    return path / "model.safetensors" if path.is_dir() else path


def load_task_data(cfg: Config, tasks: Sequence[str]) -> dict[str, TaskData]:
    """Each task's data when it can be read; tasks whose data is missing are left out, with a warning."""
    from ufo.data.build import build_task_data

    out = {}
    for t in tasks:
        try:
            out[t] = build_task_data(t, cfg.tasks[t], cfg)
        except DataError as e:
            warnings.warn(f"no data for task {t!r} ({e}); its class names and threshold stay unset", stacklevel=2)
    return out


def calibrate_threshold(tm: TaskModel, task: str, head: Task, cfg: Config, data: TaskData) -> None:
    """Fit a verification task's same/different threshold on its held-out pairs (10-fold protocol)."""
    from ufo.evaluation.predict import make_predict

    m = head.evaluate(make_predict(tm, task, cfg, cfg.train.eval_batch_size), data, seed=cfg.seed)
    info = tm.info.heads[task]
    info.threshold = float(m["threshold"])
    info.calibration = {k: float(v) for k, v in m.items() if k.startswith("acc_") or k == "roc_auc"}


@torch.no_grad()
def extract_task_model(
    model: UFOModel,
    arch: Arch | None,
    tasks: str | Sequence[str],
    cfg: Config,
    data: dict[str, TaskData] | None = None,
    source: str | None = None,
) -> TaskModel:
    """Cut `tasks` at `arch` (default: the model's active arch) out of a trained UFOModel.

    With `data` (from `load_task_data`), classification heads get their class names and
    verification heads a threshold fitted on the held-out pairs; without, those stay None.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise DeployError("give at least one task to extract")
    for t in tasks:
        if t not in model.heads:
            raise DeployError(f"unknown task {t!r}; the model's tasks are {model.tasks}")
    arch = resolve_arch(model.backbone, arch, tasks)
    backbone = extract(model.backbone, arch, tasks)
    heads, infos = {}, {}
    for t in tasks:
        heads[t], infos[t] = slice_head(model.head(t), arch.embed_dim)
    info = TaskModelInfo(
        tasks=tasks,
        arch=arch,
        space=model.space,
        heads=infos,
        preprocessing=Preprocessing.from_config(cfg, tasks),
        config=cfg.model_dump(mode="json"),
        source=source,
    )
    tm = TaskModel(backbone, heads, info).eval()
    for t, d in (data or {}).items():
        if t not in infos:
            continue
        if infos[t].output == "logits":
            infos[t].class_names = list(d.train.class_names)
        if infos[t].kind == "verification":
            calibrate_threshold(tm, t, model.head(t), cfg, d)
    return tm


def load_trained(path: str | Path) -> tuple[UFOModel, Config, dict[str, Any]]:
    """(UFOModel, config, manifest) of a run folder or its model file."""
    return load_model(model_file(path))


def task_model_from_run(
    path: str | Path,
    tasks: Sequence[str] | None = None,
    arch: str | Arch | None = None,
    with_data: bool = True,
    data_root: str | None = None,
    recalibrate_bn: bool = True,
) -> TaskModel:
    """A TaskModel for `tasks` (default: all) of a trained run at `arch` (default: the run's arch;
    or largest | smallest | random:SEED | ARCH.json). With `with_data`, the tasks' data (under
    `data_root`, default the config's) gives class names and verification thresholds, and, for a
    subnet other than the run's own arch, the heads' BatchNorm statistics re-estimated for that
    subnet (`recalibrate_bn`, as `ufo eval --arch` and `ufo run` do)."""
    from ufo.evaluation.protocol import recalibrate_bn as recalibrate

    model, cfg, _ = load_trained(path)
    if data_root is not None:
        cfg.data_root = data_root
    tasks = list(tasks or model.tasks)
    unknown = [t for t in tasks if t not in model.heads]
    if unknown:
        raise DeployError(f"unknown task {unknown[0]!r}; the model's tasks are {model.tasks}")
    a = arch_from_spec(arch, model.space, model.backbone.routes()) if isinstance(arch, str) else arch
    data = load_task_data(cfg, tasks) if with_data else None
    if a is not None and a != model.arch and data and recalibrate_bn:
        model.set_arch(a)
        recalibrate(model, data, cfg, [t for t in tasks if t in data])
    return extract_task_model(model, a, tasks, cfg, data, source=str(path))


# ----- the file -----


def save_task_model(path: str | Path, tm: TaskModel) -> None:
    """Write a TaskModel to one safetensors file (`kind: task_model`), atomically."""
    info = tm.info
    backbone_params = (
        info.space.num_params(info.arch, info.tasks)
        if info.backbone is None
        else sum(p.numel() for p in tm.backbone.parameters())
    )
    manifest = {
        "kind": KIND,
        **info.model_dump(mode="json"),
        "num_params": tm.num_params(),
        "backbone_params": backbone_params,
    }
    save_checkpoint(path, tm.state_dict(), manifest)


def load_task_model(path: str | Path) -> TaskModel:
    """Rebuild a TaskModel (plain timm/torch layers) from its file and load its weights."""
    manifest = read_manifest(path)
    if manifest.get("kind") != KIND:
        raise CheckpointError(
            f"{path} holds a {manifest.get('kind')!r} checkpoint, not a task model "
            f"(make one with `ufo extract RUN_DIR --task ... --out FILE`)"
        )
    tensors, _ = load_checkpoint(path)
    try:
        info = TaskModelInfo.model_validate({k: manifest.get(k) for k in TaskModelInfo.model_fields if k in manifest})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "manifest"
        raise CheckpointError(f"{path}: invalid task-model manifest: {where}: {err['msg']}") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in {bad[:3]}{' ...' if len(bad) > 3 else ''}")
    backbone: nn.Module
    if info.backbone is None:
        backbone = build_extracted(info.space, info.arch, info.tasks)
    elif len(info.tasks) != 1:
        raise CheckpointError(f"{path}: a timm-backbone task model serves one task, the manifest lists {info.tasks}")
    else:
        backbone = build_timm_backbone(info.backbone, info.preprocessing.in_chans)
    heads = {t: build_head(info.heads[t], info.feature_dim) for t in info.tasks}
    tm = TaskModel(backbone, heads, info)
    load_state_checked(tm, tensors, path)
    if info.backbone is None:
        mark_extracted(backbone, info.arch, list(info.tasks))
    return tm.eval()


def open_task_model(
    path: str | Path, tasks: Sequence[str] | None = None, arch: str | None = None, data_root: str | None = None
) -> TaskModel:
    """A task_model file or save_pretrained folder as it is, or a run folder / trained model file
    extracted at `arch`."""
    f = model_file(path)
    kind = read_manifest(f).get("kind")
    if kind == KIND:
        if Path(path).is_dir():
            from ufo.deploy.hf import check_folder

            check_folder(Path(path))
        tm = load_task_model(f)
        if arch is not None:
            raise DeployError(f"{path} is already extracted at one arch; --arch applies only to a run folder")
        for t in tasks or []:
            tm.check_task(t)
        return tm
    if kind == "ufo_model":
        return task_model_from_run(path, tasks, arch, data_root=data_root)
    raise DeployError(f"{path} holds a {kind!r} checkpoint; expected a run folder, a trained model or a task model")


def task_config(tm: TaskModel, data_root: str | None = None) -> Config | None:
    """The training config stored with a TaskModel (None for files without one)."""
    if tm.info.config is None:
        return None
    cfg = parse_config(tm.info.config, "task model manifest")
    if data_root is not None:
        cfg.data_root = data_root
    return cfg
