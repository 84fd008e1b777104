"""The experiment YAML as pydantic models: model (search space), tasks (kind, data, options).

Errors name the field at fault, e.g. `tasks.faces.data.recipe: ...`, and the file it came from.
Sections for training, search and deployment are added by the stages that use them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ufo.arch import ImageSize, PathName, SearchSpace, as_hw, check_task_name
from ufo.errors import ConfigError

ReaderName = Literal[
    "image_folder",
    "imagenet",
    "csv",
    "market1501",
    "lfw",
    "sop",
    "webdataset",
    "npz",
    "zip",
    "gtsrb",
    "alphadigits_mat",
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    """Where a task's images come from: a named recipe, or a reader over the user's own files."""

    recipe: str | None = None
    reader: ReaderName | None = None
    path: str | None = None  # file or folder for `reader`
    root: str | None = None  # data folder for recipes that read local files (default ../shared/data)
    on_error: Literal["raise", "skip"] = "raise"  # corrupt images: fail, or skip with a counted warning
    # memory: decode once at the input size; stream: DataLoader workers decode each image when a batch
    # needs it; auto: memory up to cache_max_mb
    cache: Literal["auto", "memory", "stream"] = "auto"
    cache_max_mb: float = Field(256.0, ge=0)  # auto: the largest decoded set (uint8 at the input size) kept in memory
    test_fraction: float = Field(0.2, gt=0, lt=1)
    use_official_split: bool = True
    max_train: int | None = Field(None, gt=0)  # keep a deterministic subset of the training split
    oneshot_runs: bool = False  # Omniglot only: add the 20-way one-shot runs as an extra metric

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.recipe is None) == (self.reader is None):
            raise ValueError("give exactly one of `recipe` (a named dataset) or `reader` (+ `path`)")
        if self.reader is not None and self.path is None:
            raise ValueError(f"reader {self.reader!r} needs `path`")
        return self


class AugmentConfig(Strict):
    hflip: bool = False
    crop_padding: int = 0
    random_resized_crop: bool | float = False  # true (area 0.35-1), or the smallest area fraction in (0, 1]
    random_erasing: float = 0.0
    rotation: float = 0.0


class TaskConfig(Strict):
    kind: str
    data: DataConfig
    options: dict[str, Any] = Field(default_factory=dict)
    loss_weight: float = Field(1.0, ge=0)
    lr_scale: float = Field(1.0, gt=0)
    batch: int | None = Field(None, gt=0)  # explicit share of each heterogeneous batch
    img_size: ImageSize | None = None  # this task's input, one side or [height, width] (default: model.img_size)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class ModelConfig(Strict):
    """The supernet: fixed dimensions plus the elastic search space."""

    img_size: ImageSize = 32
    patch_size: int = 4
    in_chans: int = 3
    head_dim: int = 32
    qkv_bias: bool = True
    stem: Literal["patch", "conv"] = "patch"
    stem_channels: list[int] = []
    depth: list[int] = [4, 5, 6]
    embed_dim: list[int] = [64, 96, 128]
    num_heads: list[int] = [2, 3, 4]
    mlp_ratio: list[float] = [2.0, 3.0, 4.0]
    paths: list[PathName] = ["shared", "task", "mix"]
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def space(self, tasks: list[str], task_img_size: dict[str, tuple[int, int]] | None = None) -> SearchSpace:
        return SearchSpace(
            tasks=tasks,
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            paths=self.paths,
            img_size=self.img_size,
            task_img_size=task_img_size or {},
            patch_size=self.patch_size,
            in_chans=self.in_chans,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias,
            stem=self.stem,
            stem_channels=self.stem_channels,
        )


class TrainConfig(Strict):
    """Optimisation recipe shared by every stage."""

    stage: Literal["all_in_one", "pretrain_mim", "task_supernet", "chip_supernet"] = "all_in_one"
    steps: int = Field(300, gt=0)
    batch_size: int = Field(128, gt=0)  # global batch, summed over tasks (and ranks)
    sampler: Literal["hetero", "round_robin", "proportional"] = "hetero"
    temperature: float = Field(1.0, gt=0)  # task shares ~ size ** (1 / temperature)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    warmup_steps: int = Field(20, ge=0)
    margin_lr_scale: float = Field(10.0, gt=0)  # margin-loss class centres learn faster, without decay
    grad_clip: float | None = Field(1.0, gt=0)
    amp: Literal["none", "bf16"] = "none"
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1 more forward
    # a mixed batch's task experts as batched matmuls, not a loop over the tasks (FSDP: the loop)
    batched_experts: bool = True
    compile: bool = False  # torch.compile each transformer block (best with hetero batches: one layout per step)
    ema_decay: float = Field(0.0, ge=0, lt=1)  # 0 turns the EMA off
    log_every: int = Field(10, gt=0)
    ckpt_every: int = Field(100, gt=0)
    eval_every: int | None = Field(
        None, ge=0
    )  # steps between validations on the eval splits (null: ckpt_every; 0: off)
    eval_batch_size: int = Field(256, gt=0)
    max_bad_steps: int = Field(5, gt=0)  # consecutive non-finite losses before the run stops
    workers: int | None = Field(None, ge=0)  # DataLoader workers decoding streamed tasks (None: min(8, CPU cores))
    prefetch: int = Field(4, gt=0)  # batches each worker prepares ahead
    threads: int | None = Field(None, gt=0)
    # CPU: glibc's malloc keeps freed memory for the next step instead of unmapping it (the step's
    # re-allocated gradients then cost no page faults); the process holds its peak step's memory
    keep_freed_memory: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU of this rank when there is one
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP) the model
    dist_timeout: float = Field(60.0, gt=0)  # minutes a collective waits under torchrun (rank 0 validates meanwhile)
    arch: str | None = None  # fixed arch for all-in-one training: largest, smallest, random:SEED or ARCH.json
    paths: PathName | None = "shared"  # fixed FFN path for all-in-one training (None: the router decides)


class InitConfig(Strict):
    """Where the weights start: scratch, a timm ViT state dict, a MIM pre-training run, or a
    trained run of the same model and tasks (e.g. All in One, before the task supernet)."""

    kind: Literal["scratch", "timm", "mim", "run"] = "scratch"
    path: str | None = None  # timm: a .safetensors/.pth state dict; mim, run: a run folder or its model file
    timm_model: str | None = None  # timm: a model name loaded with pretrained=True (needs internet)
    timm_num_heads: int | None = Field(None, gt=0)  # timm: heads of a `path` state dict (default: inferred)

    @model_validator(mode="after")
    def _source(self) -> InitConfig:
        if self.kind != "timm" and self.timm_num_heads is not None:
            raise ValueError("`timm_num_heads` only applies to kind 'timm'")
        if self.kind == "scratch" and (self.path or self.timm_model):
            raise ValueError("kind 'scratch' takes neither `path` nor `timm_model`")
        if self.kind == "timm" and (self.path is None) == (self.timm_model is None):
            raise ValueError("kind 'timm' needs exactly one of `path` (a local state dict file) or `timm_model`")
        if self.kind == "mim" and (self.path is None or self.timm_model is not None):
            raise ValueError(
                "kind 'mim' needs `path` (a pretrain_mim run folder or its checkpoint) and no `timm_model`"
            )
        if self.kind == "run" and (self.path is None or self.timm_model is not None):
            raise ValueError(
                "kind 'run' needs `path` (a trained run folder or its model.safetensors) and no `timm_model`"
            )
        return self


class MimConfig(Strict):
    """SimMIM pre-training (`train.stage: pretrain_mim`): which patches are hidden and how many."""

    mask_ratio: float = Field(0.6, gt=0, lt=1)
    mask_patch_size: int | None = Field(None, gt=0)  # default: 2 x model.patch_size if it divides img_size

    def patch(self, img_size: ImageSize, patch_size: int) -> int:
        """The mask patch size in pixels (the default resolved against the model's sizes)."""
        if self.mask_patch_size is not None:
            return self.mask_patch_size
        return 2 * patch_size if all(v % (2 * patch_size) == 0 for v in as_hw(img_size)) else patch_size


class ChipConfig(Strict):
    """Architecture slimming (`train.stage: chip_supernet`): the sandwich rule with in-place distillation."""

    num_random: int = Field(2, ge=0)  # random subnets per step, besides the largest and the smallest
    distill: bool = True  # smaller subnets learn from the largest one's outputs (else from the labels)
    distill_weight: float = Field(1.0, ge=0)
    temperature: float = Field(1.0, gt=0)  # softens the logits in the KL term of classification tasks
    # With distill, smaller subnets also learn from the labels at this weight (without distill: 1).
    # Not 0 by default: from a weak start the students copy a near-chance teacher and pull the shared
    # weights with them (GTSRB, 1000 steps from scratch: top-1 0.06 at 0, 0.38 at 1).
    label_weight: float = Field(1.0, ge=0)  # with distill: smaller subnets also learn from the labels (without: 1)
    reorder: bool = True  # sort heads and FFN units by importance before the first step
    tasks: list[str] | None = None  # train only these tasks' batches (so only their paths); None: every task


class TaskSupernetConfig(Strict):
    """Path routing (`train.stage: task_supernet`): Gumbel temperature schedule, expert cost, router LR."""

    tau_start: float = Field(5.0, gt=0)  # Gumbel-Softmax temperature at the first step
    tau_end: float = Field(0.1, gt=0)  # ... at the last step
    anneal: Literal["exponential", "linear"] = "exponential"
    expert_cost: float = Field(0.0, ge=0)  # weight of the expected extra task-expert parameters in the loss
    router_lr_scale: float = Field(10.0, gt=0)  # router and mix logits learn at train.lr * this, without decay

    @model_validator(mode="after")
    def _cools(self) -> TaskSupernetConfig:
        if self.tau_end > self.tau_start:
            raise ValueError(
                f"tau_end ({self.tau_end}) must not exceed tau_start ({self.tau_start}): "
                "the temperature is annealed down"
            )
        return self


class StageSteps(Strict):
    """One training stage of `ufo run`: its length and config overrides on top of the experiment's."""

    steps: int | None = Field(None, gt=0)  # optimiser steps (default: train.steps)
    set: list[str] = Field(default_factory=list)  # KEY=VALUE overrides for this stage only, e.g. train.lr=5e-4


class BaselinesConfig(Strict):
    """Single-task baselines trained beside the All-in-One model: the same recipe on one task, with
    that task's share of the batch (`tasks.T.batch`, else batch_size / number of tasks), so that
    at the default length each costs 1/T of the All-in-One compute."""

    enabled: bool = False
    steps: int | None = Field(None, gt=0)  # default: the All-in-One steps


class ChipEvalConfig(StageSteps):
    """The chip-supernet stage, plus the inherited subnets evaluated for the metric-vs-parameters plot."""

    eval_subnets: int = Field(6, ge=2)  # the smallest, the largest and random ones (no fine-tuning)


class PredictorsConfig(Strict):
    """GP-NAS predictor data: subnets evaluated on each task (metric) and timed (latency)."""

    metric_samples: int = Field(50, ge=10)  # (5-fold cross-validation needs 10)
    latency_samples: int = Field(100, ge=10)  # timed only for tasks with a latency budget


class SearchBudget(Strict):
    """What one task's chosen subnet may cost; unset limits do not bind (with none set, the search
    takes the largest subnet's parameter count as the limit: the best predicted metric wins)."""

    max_latency_ms: float | None = Field(None, gt=0)  # predicted then measured on `backend`, batch 1
    # floor = the smallest subnet's upper-quartile latency + 5%, timed with the largest one on `backend`
    max_latency_fraction: float | None = Field(
        None, ge=0, le=1
    )  # relative budget: floor + fraction x (largest - floor)
    max_params: int | None = Field(None, gt=0)  # parameters of the extracted task model's backbone
    max_flops: int | None = Field(None, gt=0)  # FLOPs of one image through the task's path
    backend: Literal["torch-cpu", "ort-cpu", "cuda"] | None = None  # default: pipeline.search.backend

    @model_validator(mode="after")
    def _one_latency_limit(self) -> SearchBudget:
        if self.max_latency_ms is not None and self.max_latency_fraction is not None:
            raise ValueError(
                f"give max_latency_ms ({self.max_latency_ms}) or max_latency_fraction "
                f"({self.max_latency_fraction}), not both"
            )
        return self


class SearchStageConfig(Strict):
    """The search stage: the latency backend and a budget per task (tasks without one: `default`)."""

    backend: Literal["torch-cpu", "ort-cpu", "cuda"] = "torch-cpu"  # where latency is predicted and measured
    default: SearchBudget = Field(default_factory=SearchBudget)
    budgets: dict[str, SearchBudget] = Field(default_factory=dict)
    trials: int = Field(2000, gt=0)  # NSGA-II evaluations of the predictors
    top_k: int = Field(8, gt=0)  # front subnets evaluated and timed for real (more if none meets the budget)

    def budget(self, task: str) -> SearchBudget:
        """`task`'s budget with the backend resolved."""
        b = self.budgets.get(task, self.default)
        return b.model_copy(update={"backend": b.backend or self.backend})


class ExportStageConfig(Strict):
    """The export stage: ONNX of every chosen task model, optionally INT8, timed with ONNX Runtime."""

    int8: Literal["dynamic", "static"] | None = None
    opset: int = Field(18, ge=17)
    latency_repeats: int = Field(30, gt=0)  # timed batch-1 calls per model (1 thread)


class PipelineConfig(Strict):
    """`ufo run`: the stages after All in One and their settings. Every field has a default."""

    tasks: list[str] | None = None  # tasks to search, extract and export (default: every task)
    all_in_one: StageSteps = Field(default_factory=StageSteps)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    task_supernet: StageSteps = Field(default_factory=StageSteps)
    chip_supernet: ChipEvalConfig = Field(default_factory=ChipEvalConfig)
    predictors: PredictorsConfig = Field(default_factory=PredictorsConfig)
    search: SearchStageConfig = Field(default_factory=SearchStageConfig)
    export: ExportStageConfig = Field(default_factory=ExportStageConfig)


class Config(BaseModel):
    """A whole experiment. Every top-level section is known here: a misspelled one (`trian:`) is an
    error naming the closest section, not a section silently ignored."""

    model_config = ConfigDict(extra="forbid")

    name: str = "ufo"
    seed: int = 0
    data_root: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    tasks: dict[str, TaskConfig] = Field(min_length=1)
    train: TrainConfig = Field(default_factory=TrainConfig)
    init: InitConfig = Field(default_factory=InitConfig)
    mim: MimConfig = Field(default_factory=MimConfig)
    chip_supernet: ChipConfig = Field(default_factory=ChipConfig)
    task_supernet: TaskSupernetConfig = Field(default_factory=TaskSupernetConfig)
    pipeline: PipelineConfig | None = None  # `ufo run` settings (None: the defaults)

    @field_validator("tasks")
    @classmethod
    def _task_names(cls, v: dict[str, TaskConfig]) -> dict[str, TaskConfig]:
        for name in v:
            check_task_name(name)
        return v

    @model_validator(mode="after")
    def _kinds(self) -> Config:
        from ufo.tasks import TASK_KINDS

        for name, t in self.tasks.items():
            if t.kind not in TASK_KINDS:
                raise ValueError(f"tasks.{name}.kind: unknown task kind {t.kind!r}; available: {sorted(TASK_KINDS)}")
        m, p = self.mim.mask_patch_size, self.model.patch_size
        for where, size in (
            ("model.img_size", self.model.img_size),
            *((f"tasks.{n}.img_size", t.img_size) for n, t in self.tasks.items() if t.img_size),
        ):
            h, w = as_hw(size)
            if min(h, w) < 1 or h % p or w % p:
                raise ValueError(
                    f"{where}: {h}x{w} (HxW) must be a positive multiple of model.patch_size ({p}) in both sides"
                )
        if m is not None and (m % p or any(v % m for v in as_hw(self.model.img_size))):
            raise ValueError(
                f"mim.mask_patch_size: {m} must be a multiple of model.patch_size ({p}) "
                f"and divide model.img_size ({self.model.img_size})"
            )
        return self

    @model_validator(mode="after")
    def _pipeline_tasks(self) -> Config:
        p = self.pipeline
        if p is None:
            return self
        for where, names in (("pipeline.tasks", p.tasks or []), ("pipeline.search.budgets", list(p.search.budgets))):
            unknown = [n for n in names if n not in self.tasks]
            if unknown:
                raise ValueError(f"{where}: unknown task(s) {unknown}; the config's tasks are {list(self.tasks)}")
        return self

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def input_size(self, task: str | None = None) -> tuple[int, int]:
        """(height, width) of `task`'s input: its own img_size, else the model's."""
        t = self.tasks.get(task) if task is not None else None
        return as_hw(t.img_size if t is not None and t.img_size is not None else self.model.img_size)

    def space(self) -> SearchSpace:
        base = as_hw(self.model.img_size)
        sizes = {n: self.input_size(n) for n in self.task_names if self.input_size(n) != base}
        return self.model.space(self.task_names, sizes)

    def only(self, task: str) -> Config:
        """The same experiment restricted to one task (single-task baselines)."""
        if task not in self.tasks:
            raise ConfigError(f"--only {task!r}: no such task; the config's tasks are {self.task_names}")
        data = self.model_dump(mode="json")
        data["tasks"] = {task: data["tasks"][task]}
        data["name"] = f"{self.name}-only-{task}"
        return parse_config(data, f"{self.name} (--only {task})")


def _format(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        lines.append(
            f"{loc}: {msg}"
            + (f" (got {err['input']!r})" if err["type"] != "missing" and not isinstance(err["input"], dict) else "")
        )
    if len(lines) == 1:  # the usual case: one line
        return f"invalid config {source}: {lines[0]}"
    return f"invalid config {source}:\n  " + "\n  ".join(lines)


def check_sections(data: dict, source: str = "<dict>") -> None:
    """A ConfigError naming the first unknown top-level key and the section it most resembles."""
    known = list(Config.model_fields)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}?" if close else f"the sections are {', '.join(known)}"
            raise ConfigError(f"{source}: unknown top-level section {key!r}; {hint}")


def parse_config(data: dict, source: str = "<dict>") -> Config:
    if isinstance(data, dict):
        check_sections(data, source)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, source)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.steps=100")
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read and validate an experiment YAML; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return parse_config(apply_overrides(data, overrides or []), str(path))
