"""Where the weights start: a timm ViT state dict, the backbone of a SimMIM pre-training run, or
a trained run of the same model and tasks (`init_from_run`, e.g. All in One before the task supernet).

timm names map one to one onto the SuperViT's largest arch; timm's `mlp` goes into the shared
expert and is copied into every task expert. Where shapes differ, the patch kernel and the
position grid are resampled with timm's own functions, qkv and proj go through the
(3, heads, head_dim, dim) view, and every other dimension keeps the first-k overlap (the elastic
slicing convention): a smaller model takes the leading slice, a larger one keeps its own
initialisation outside it. Layer scale (`ls1`, `ls2`) is folded exactly into the projection it
scales. An `InitReport` lists what was mapped, what was resized, and what was left out on either
side, so a silent partial load cannot pass unnoticed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ufo.arch import Arch, SearchSpace
from ufo.checkpoint import atomic_write_text, load_checkpoint, load_state_checked
from ufo.config import Config
from ufo.errors import CheckpointError, ConfigError
from ufo.nn.vit import SuperViT
from ufo.train import distributed as dist

StateDict = dict[str, torch.Tensor]
TIMM_HEAD_DIM = 64  # every timm ViT family uses 64-wide heads; the fallback guess for a bare state dict
NOT_REPRESENTED = {  # timm features a SuperViT does not have: their outputs will differ
    "norm_pre.": "a pre-norm before the blocks (CLIP-style)",
    "fc_norm.": "a norm after average pooling",
    "attn.q_norm.": "qk-norm in attention",
    "attn.norm.": "a norm inside attention",
    "reg_token": "register tokens",
}


@dataclass
class Resized:
    name: str  # our tensor
    source: str  # the source tensor it came from
    from_shape: list[int]
    to_shape: list[int]
    how: str


@dataclass
class InitReport:
    kind: str  # "timm" or "mim"
    source: str
    mapped: list[tuple[str, str]] = field(default_factory=list)  # (source tensor, our tensor)
    resized: list[Resized] = field(default_factory=list)
    unused_source: list[str] = field(default_factory=list)  # source tensors that initialise nothing
    uninitialised: list[str] = field(default_factory=list)  # our tensors that keep their fresh init
    notes: list[str] = field(default_factory=list)

    def summary(self, limit: int = 8) -> str:
        def names(items: list[str]) -> str:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more

        lines = [
            f"init from {self.kind} {self.source}: {len(self.mapped)} tensors mapped, {len(self.resized)} resized, "
            f"{len(self.unused_source)} source tensors unused, {len(self.uninitialised)} of ours left at init"
        ]
        lines += [
            f"  resized {r.name}: {tuple(r.from_shape)} -> {tuple(r.to_shape)} ({r.how})" for r in self.resized[:limit]
        ]
        if len(self.resized) > limit:
            lines.append(f"  ... {len(self.resized) - limit} more resized (see init_report.json)")
        if self.unused_source:
            lines.append(f"  unused source tensors: {names(self.unused_source)}")
        if self.uninitialised:
            lines.append(f"  ours left at init: {names(self.uninitialised)}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----- loading state dicts -----


def load_state_dict_file(path: str | Path) -> StateDict:
    """A state dict from a local `.safetensors` or `.pth/.pt/.bin` file (loaded with
    weights_only=True: no code runs), unwrapped from a 'state_dict' / 'model' entry if needed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"init.path: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types (pickle, zip, safetensors, OSError)
        raise CheckpointError(
            f"{path}: cannot read a state dict from this file ({type(e).__name__}: {e}); "
            "expected a .safetensors file or a torch.save'd state dict (.pth/.pt)"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict (a mapping of tensors)")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP-wrapped model
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def timm_pretrained_state_dict(name: str) -> tuple[StateDict, int | None]:
    """(state dict, heads) of `timm.create_model(name, pretrained=True)`; downloading needs internet."""
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"init.timm_model: {name!r} is not a timm model; list ViTs with timm.list_models('vit_*')")
    try:
        with torch.random.fork_rng(devices=[]):  # building the model must not move the run's RNG
            m = timm.create_model(name, pretrained=True)
    except Exception as e:
        raise CheckpointError(
            f"init.timm_model: could not load the pretrained weights of {name!r} ({type(e).__name__}: {e}). "
            "This downloads them from the Hugging Face Hub and needs internet access. Offline, save the "
            "state dict on a machine that has access (safetensors.torch.save_file(timm.create_model("
            f"'{name}', pretrained=True).state_dict(), 'vit.safetensors')) and set init.path to that file "
            "instead of init.timm_model."
        ) from None
    blocks = getattr(m, "blocks", None)
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks is not None and len(blocks) else None
    return m.state_dict(), heads


def _backbone(model: nn.Module) -> tuple[SuperViT, str]:
    """The SuperViT inside `model` (a SuperViT, a UFOModel or a wrapper with `.backbone`) and its prefix."""
    if isinstance(model, SuperViT):
        return model, ""
    bb = getattr(model, "backbone", None)
    if isinstance(bb, SuperViT):
        return bb, next(n for n, m in model.named_modules() if m is bb) + "."
    raise TypeError(f"expected a SuperViT or a module with a SuperViT `.backbone`, got {type(model).__name__}")


# ----- fitting one tensor into another's shape -----


def fit_overlap(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """A copy of `dst` holding `src` over their first-k overlap in every dimension."""
    if dst.ndim != src.ndim:
        raise ValueError(f"cannot fit a {src.ndim}-d tensor {tuple(src.shape)} into {tuple(dst.shape)}")
    out = dst.detach().clone()
    idx = tuple(slice(0, min(a, b)) for a, b in zip(dst.shape, src.shape))
    out[idx] = src[idx].to(dst.dtype)
    return out


class _Writer:
    """Writes source tensors into the backbone and records each write in the report."""

    def __init__(self, backbone: SuperViT, report: InitReport) -> None:
        self.state = backbone.state_dict()  # shares storage with the parameters
        self.report = report
        self.written: set[str] = set()  # our tensors
        self.used: set[str] = set()  # source tensors

    def put(
        self, ours: str, theirs: str, value: torch.Tensor, how: str | None = None, from_shape: torch.Size | None = None
    ) -> None:
        dst = self.state[ours]
        from_shape = value.shape if from_shape is None else from_shape
        if how is None and value.shape != dst.shape:
            how = "first-k slice/pad"
        if value.shape != dst.shape:
            value = fit_overlap(dst, value)
        with torch.no_grad():
            dst.copy_(value)
        self.report.mapped.append((theirs, ours))
        if how is not None:
            self.report.resized.append(Resized(ours, theirs, list(from_shape), list(dst.shape), how))
        self.written.add(ours)
        self.used.add(theirs)


# ----- timm -----


def _timm_heads(
    sd: StateDict, space_heads: int, head_dim: int, num_heads: int | None, report: InitReport
) -> tuple[int, int]:
    """timm's (heads, head_dim): given, else the same layout as ours, else 64-wide heads."""
    inner = sd["blocks.0.attn.qkv.weight"].shape[0] // 3
    if num_heads is not None:
        if inner % num_heads:
            raise ConfigError(f"init.timm_num_heads: {num_heads} does not divide the timm attention width {inner}")
        return num_heads, inner // num_heads
    if inner == space_heads * head_dim:
        return space_heads, head_dim
    for hd in (TIMM_HEAD_DIM, head_dim):
        if inner % hd == 0:
            report.notes.append(
                f"timm's head count was inferred as {inner // hd} heads of {hd} "
                f"(width {inner}); set init.timm_num_heads if that is wrong"
            )
            return inner // hd, hd
    raise ConfigError(f"cannot infer the number of heads of a timm attention of width {inner}; set init.timm_num_heads")


def _source_grid(sd: StateDict, source: str, ours: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """(prefix tokens in timm's pos_embed, its patch grid (rows, cols)). A state dict does not say
    its grid: a square one is assumed (timm's models are square), else our own grid `ours` when the
    token count matches it (a non-square model saved at our size)."""
    n = sd["pos_embed"].shape[1]
    npt = ("cls_token" in sd) + (sd["reg_token"].shape[1] if "reg_token" in sd else 0)
    for p in (npt, 0):  # the prefix tokens the state dict has first: 0 only for no_embed_class models
        g = math.isqrt(n - p)
        if g * g == n - p:
            return p, (g, g)
        if n - p == ours[0] * ours[1]:
            return p, ours
    raise CheckpointError(
        f"{source}: pos_embed of {n} tokens is neither a square patch grid nor our "
        f"{ours[0]}x{ours[1]} grid, plus {npt} prefix tokens"
    )


def _map_patch_conv(w: _Writer, sd: StateDict, s: SearchSpace) -> None:
    """timm's patch conv into ours: input channels adapted, kernel resampled, first-k embed dim."""
    kernel = sd["patch_embed.proj.weight"]  # (D, C, p, p)
    how = []
    if kernel.shape[1] != s.in_chans:
        from timm.models import adapt_input_conv

        kernel = adapt_input_conv(s.in_chans, kernel, base_chans=kernel.shape[1])
        how.append(f"in_chans {sd['patch_embed.proj.weight'].shape[1]} -> {s.in_chans} (timm adapt_input_conv)")
    if tuple(kernel.shape[-2:]) != (s.patch_size, s.patch_size):
        from timm.layers import resample_patch_embed

        how.append(
            f"patch {kernel.shape[-2]}x{kernel.shape[-1]} -> {s.patch_size}x{s.patch_size} (timm resample_patch_embed)"
        )
        kernel = resample_patch_embed(kernel, [s.patch_size, s.patch_size])
    if kernel.shape[0] != s.max_embed_dim:
        how.append("first-k embed dim")
    w.put(
        "patch_embed.proj.weight",
        "patch_embed.proj.weight",
        kernel,
        "; ".join(how) or None,
        sd["patch_embed.proj.weight"].shape,
    )
    if "patch_embed.proj.bias" in sd:
        w.put("patch_embed.proj.bias", "patch_embed.proj.bias", sd["patch_embed.proj.bias"])


def _map_embeddings(w: _Writer, sd: StateDict, vit: SuperViT) -> None:
    s = vit.space
    if "cls_token" in sd:
        w.put("cls_token", "cls_token", sd["cls_token"])
    if s.stem == "conv":
        w.report.notes.append(
            "model.stem is 'conv': timm's patch_embed conv has no counterpart; the stem keeps its fresh init"
        )
    else:
        _map_patch_conv(w, sd, s)
    if "pos_embed" in sd:
        grid = s.grid()  # the base grid (rows, cols) our pos_embed is laid out on
        pos, (prefix, src) = sd["pos_embed"], _source_grid(sd, w.report.source, grid)
        how = []
        if src != grid:
            from timm.layers import resample_abs_pos_embed

            pos = resample_abs_pos_embed(pos, list(grid), list(src), num_prefix_tokens=prefix)
            how.append(f"grid {src[0]}x{src[1]} -> {grid[0]}x{grid[1]} (timm resample_abs_pos_embed)")
        if prefix == 0:  # timm adds no position to the class token; a zero row here is the same
            cls_pos = torch.zeros_like(pos[:, :1])
            w.report.notes.append("timm's pos_embed has no class-token row (no_embed_class); ours gets zeros there")
        else:
            cls_pos = pos[:, :1]
            if prefix > 1:
                how.append(f"dropped {prefix - 1} register-token rows")
        pos = torch.cat([cls_pos, pos[:, prefix:]], 1)
        if pos.shape[-1] != s.max_embed_dim:
            how.append("first-k embed dim")
        w.put("pos_embed", "pos_embed", pos, "; ".join(how) or None, sd["pos_embed"].shape)


def _map_attention(w: _Writer, sd: StateDict, i: int, vit: SuperViT, heads: tuple[int, int]) -> None:
    s, t = vit.space, f"blocks.{i}.attn."
    H, hd, E = s.max_heads, s.head_dim, s.max_embed_dim
    Ht, hdt = heads
    layout = None if (Ht, hdt) == (H, hd) else f"heads {Ht}x{hdt} -> {H}x{hd} via the (3, H, head_dim, C) view"
    qkv = sd[t + "qkv.weight"]
    w.put(
        t + "qkv.weight",
        t + "qkv.weight",
        fit_overlap(w.state[t + "qkv.weight"].view(3, H, hd, E), qkv.view(3, Ht, hdt, -1)).reshape(3 * H * hd, E),
        layout or (None if qkv.shape[1] == E else "first-k embed dim"),
        qkv.shape,
    )
    if t + "qkv.bias" in sd and t + "qkv.bias" in w.state:
        b = sd[t + "qkv.bias"]
        w.put(
            t + "qkv.bias",
            t + "qkv.bias",
            fit_overlap(w.state[t + "qkv.bias"].view(3, H, hd), b.view(3, Ht, hdt)).reshape(-1),
            layout,
            b.shape,
        )
    gamma = sd.get(f"blocks.{i}.ls1.gamma")
    proj_w, proj_b = sd[t + "proj.weight"], sd[t + "proj.bias"]
    if gamma is not None:  # x + gamma * proj(a) == x + proj'(a) with proj' rows scaled by gamma
        proj_w, proj_b = proj_w * gamma[:, None], proj_b * gamma
        w.used.add(f"blocks.{i}.ls1.gamma")
    w.put(
        t + "proj.weight",
        t + "proj.weight",
        fit_overlap(w.state[t + "proj.weight"].view(E, H, hd), proj_w.view(proj_w.shape[0], Ht, hdt)).reshape(
            E, H * hd
        ),
        layout or (None if proj_w.shape[0] == E else "first-k embed dim"),
        proj_w.shape,
    )
    w.put(t + "proj.bias", t + "proj.bias", proj_b)


def _map_block(w: _Writer, sd: StateDict, i: int, vit: SuperViT, heads: tuple[int, int]) -> None:
    b = f"blocks.{i}."
    for norm in ("norm1", "norm2"):
        for p in ("weight", "bias"):
            if b + f"{norm}.{p}" in sd:
                w.put(b + f"{norm}.{p}", b + f"{norm}.{p}", sd[b + f"{norm}.{p}"])
    _map_attention(w, sd, i, vit, heads)
    mlp = {
        f"{fc}.{p}": sd[b + f"mlp.{fc}.{p}"]
        for fc in ("fc1", "fc2")
        for p in ("weight", "bias")
        if b + f"mlp.{fc}.{p}" in sd
    }
    gamma = sd.get(b + "ls2.gamma")
    if gamma is not None and "fc2.weight" in mlp:
        mlp["fc2.weight"], mlp["fc2.bias"] = mlp["fc2.weight"] * gamma[:, None], mlp["fc2.bias"] * gamma
        w.used.add(b + "ls2.gamma")
    experts = ["shared", *(f"experts.{t}" for t in vit.tasks)]
    for key, value in mlp.items():
        for e in experts:  # timm's one FFN starts the shared expert and every task expert alike
            w.put(b + f"mlp.{e}.{key}", b + f"mlp.{key}", value)


def init_from_timm(
    model: nn.Module,
    source: Mapping[str, torch.Tensor] | str | Path | None = None,
    timm_model: str | None = None,
    num_heads: int | None = None,
) -> InitReport:
    """Load a timm VisionTransformer's weights into the largest arch of `model`'s SuperViT.

    `source` is a state dict or a local file (.safetensors, .pth, .pt); `timm_model` a timm model
    name, loaded with pretrained=True. `num_heads` is timm's head count (inferred when omitted).
    """
    vit, prefix = _backbone(model)
    if (source is None) == (timm_model is None):
        raise ValueError("init_from_timm: give exactly one of `source` (state dict or file) or `timm_model`")
    if timm_model is not None:
        sd, heads = timm_pretrained_state_dict(timm_model)
        num_heads, name = num_heads or heads, f"timm:{timm_model}"
    elif isinstance(source, Mapping):
        sd, name = dict(source), "<state dict>"
    else:
        assert source is not None  # exactly one of source and timm_model, checked above
        sd, name = load_state_dict_file(source), str(source)
    sd = {k: v.detach().float() if v.is_floating_point() else v for k, v in sd.items()}
    missing = [
        k for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight") if k not in sd
    ]
    if missing:
        raise CheckpointError(
            f"{name} does not look like a timm VisionTransformer state dict: no {missing[0]} "
            f"(its first keys: {list(sd)[:6]})"
        )

    report = InitReport("timm", name)
    layout = _timm_heads(sd, vit.space.max_heads, vit.space.head_dim, num_heads, report)
    w = _Writer(vit, report)
    _map_embeddings(w, sd, vit)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(min(depth, vit.space.max_depth)):
        _map_block(w, sd, i, vit, layout)
    for p in ("weight", "bias"):
        if f"norm.{p}" in sd:
            w.put(f"norm.{p}", f"norm.{p}", sd[f"norm.{p}"])
    if depth != vit.space.max_depth:
        report.notes.append(
            f"timm has {depth} blocks, the supernet {vit.space.max_depth}: "
            f"the first {min(depth, vit.space.max_depth)} are mapped"
        )
    for key, what in NOT_REPRESENTED.items():
        if any(key in k for k in sd):
            report.notes.append(f"the timm model has {what} ({key}*), which the SuperViT lacks: outputs will differ")
    _finish(report, sd, w, model, prefix)
    return report


def _finish(report: InitReport, source: Mapping[str, torch.Tensor], w: _Writer, model: nn.Module, prefix: str) -> None:
    report.unused_source = [k for k in source if k not in w.used]
    report.uninitialised = [
        k for k in model.state_dict() if not (k.startswith(prefix) and k[len(prefix) :] in w.written)
    ]
    report.mapped = [(s, prefix + o) for s, o in report.mapped]
    for r in report.resized:
        r.name = prefix + r.name


# ----- MIM -----

MIM_PREFIXES = {"ufo_model": "backbone.", "train_state": "model.ufo.backbone."}  # see ufo.train.mim.SimMIM


def _task_specific(name: str) -> bool:
    """Backbone tensors a MIM run never trains (it runs every FFN on the shared path)."""
    return ".mlp.experts." in name or name.endswith(("router_logits", "mix_logits"))


def init_from_mim(model: nn.Module, path: str | Path) -> InitReport:
    """Load the backbone of a `pretrain_mim` run (its folder, its model.safetensors, or a training
    checkpoint) into `model`'s SuperViT. MIM trains the task-independent backbone (embeddings,
    attention, norms, the shared FFN); each task expert starts as a copy of the shared one, and the
    router and mix logits keep their fresh init. The task lists of the two runs may differ."""
    vit, prefix = _backbone(model)
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        hint = " (an unfinished run keeps its weights in checkpoints/latest.safetensors)" if path.is_dir() else ""
        raise CheckpointError(
            f"init.path: {file} not found; expected a pretrain_mim run folder or its checkpoint{hint}"
        )
    tensors, manifest = load_checkpoint(file)
    kind, stage = manifest.get("kind"), (manifest.get("config") or {}).get("train", {}).get("stage")
    if kind not in MIM_PREFIXES or stage != "pretrain_mim":
        raise CheckpointError(
            f"{file} holds a {kind!r} checkpoint of a {stage!r} run, not the model or training "
            "checkpoint of a MIM pre-training run (train.stage: pretrain_mim)"
        )
    src = MIM_PREFIXES[kind]
    ema = "ema.module.ufo.backbone."  # timm's ModelEmaV3 keeps its copy as `module`
    if kind == "train_state" and any(k.startswith(ema) for k in tensors):
        src = ema  # the weights the run would have shipped
    report = InitReport("mim", str(file))
    w = _Writer(vit, report)
    mine = [k for k in w.state if not _task_specific(k)]
    bad = [
        f"{k}: checkpoint {tuple(tensors[src + k].shape)} vs model {tuple(w.state[k].shape)}"
        for k in mine
        if src + k in tensors and tensors[src + k].shape != w.state[k].shape
    ]
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        raise CheckpointError(
            f"{file} was pre-trained with other model dimensions; use the MIM run's `model:` "
            f"section. Mismatches: {', '.join(bad[:5])}{more}"
        )
    for k in mine:
        if src + k in tensors:
            w.put(k, src + k, tensors[src + k])
    for k in list(w.state):
        if ".mlp.experts." in k:
            blk, rest = k.split(".mlp.experts.", 1)
            shared = f"{blk}.mlp.shared.{rest.split('.', 1)[1]}"
            if shared in w.written:
                w.put(k, src + shared, w.state[shared])
    report.notes.append("task experts start as copies of the MIM-trained shared FFN")
    _finish(report, {k: v for k, v in tensors.items() if k.startswith(src)}, w, model, prefix)
    return report


# ----- an earlier run of the same model -----

UNTRAINED_EXPERT_STAGES = ("all_in_one", "pretrain_mim")  # stages that train only the paths their arch fixes


def init_from_run(model: nn.Module, path: str | Path) -> InitReport:
    """Load a trained `ufo_model` file (a run folder or its model.safetensors) into a UFOModel:
    backbone, routers and heads. The search space, the task list and the heads must match.

    Task experts the source never trained start as copies of their block's shared expert, so that
    every path starts out computing the same function: an All-in-One (or MIM) run trains a task's
    expert in a block only where its arch puts the task on `task` or `mix` there, or leaves it to
    the router; with the default `train.paths: shared` no expert is trained.
    """
    vit, prefix = _backbone(model)
    heads = getattr(model, "heads", None)
    if not isinstance(heads, nn.ModuleDict):
        raise TypeError(f"init_from_run loads a whole UFOModel (backbone and heads), got {type(model).__name__}")
    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        hint = " (an unfinished run has only checkpoints/; finish it with --resume)" if path.is_dir() else ""
        raise CheckpointError(
            f"init.path: {file} not found; expected a trained run folder or its model.safetensors{hint}"
        )
    tensors, manifest = load_checkpoint(file)
    if manifest.get("kind") != "ufo_model":
        raise CheckpointError(
            f"init.path: {file} holds a {manifest.get('kind')!r} checkpoint, not a trained model "
            "(ufo_model); give the run folder or its model.safetensors"
        )
    if list(manifest.get("tasks") or []) != vit.tasks:
        raise CheckpointError(
            f"init.path: {file} was trained on tasks {manifest.get('tasks')}, this config has "
            f"{vit.tasks}; init kind 'run' needs the same tasks in the same order"
        )
    saved = SearchSpace.model_validate(manifest["space"])
    if saved != vit.space:
        diff = [
            f"{k} (run {getattr(saved, k)} vs config {getattr(vit.space, k)})"
            for k in SearchSpace.model_fields
            if getattr(saved, k) != getattr(vit.space, k)
        ]
        raise CheckpointError(
            f"init.path: {file} has another search space; use that run's `model:` section. "
            f"Differing fields: {', '.join(diff)}"
        )
    theirs = manifest.get("heads") or {}
    bad = [
        f"{t} (run {theirs.get(t)} vs config {{'kind': {h.kind!r}, 'num_classes': {h.num_classes}}})"
        for t, h in heads.items()
        if theirs.get(t) != {"kind": h.kind, "num_classes": h.num_classes}
    ]
    if bad:
        raise CheckpointError(f"init.path: {file} has other task heads: {', '.join(bad)}")
    load_state_checked(model, tensors, file)

    report = InitReport("run", str(file), mapped=[(k, k) for k in tensors])
    stage = ((manifest.get("config") or {}).get("train") or {}).get("stage", "all_in_one")
    if stage in UNTRAINED_EXPERT_STAGES:
        arch = Arch.model_validate(manifest["arch"])
        copied, replaced = [], set()
        with torch.no_grad():
            for i, blk in enumerate(vit.super_blocks()):
                for t in vit.tasks:
                    if i < arch.depth and arch.path(t, i) != "shared":
                        continue  # trained on its task's rows: kept
                    blk.mlp.experts[t].load_state_dict(blk.mlp.shared.state_dict())
                    copied.append(f"{t}@{i}")
                    for k in blk.mlp.shared.state_dict():
                        ours = f"{prefix}blocks.{i}.mlp.experts.{t}.{k}"
                        replaced.add(ours)
                        report.mapped.append((f"{prefix}blocks.{i}.mlp.shared.{k}", ours))
        report.mapped = [(s, o) for s, o in report.mapped if not (s == o and o in replaced)]
        report.unused_source = sorted(replaced)
        if copied:
            report.notes.append(
                f"the {stage} run never trained {len(copied)} of {len(vit.tasks) * len(vit.blocks)} "
                f"task experts (task@block: {', '.join(copied[:8])}{' ...' if len(copied) > 8 else ''}): "
                "they start as copies of the shared expert"
            )
    return report


# ----- dispatch -----


def apply_init(model: nn.Module, cfg: Config, out: str | Path | None = None) -> InitReport | None:
    """Initialise `model` as `cfg.init` says (None for scratch). With `out`, the summary is printed
    (rank 0) and the full report written to OUT/init_report.json."""
    i = cfg.init
    if i.kind == "scratch":
        return None
    if i.kind == "timm":
        report = init_from_timm(model, i.path, timm_model=i.timm_model, num_heads=i.timm_num_heads)
    elif i.path is None:  # the config requires a path for kinds mim and run
        raise ConfigError(f"init: kind {i.kind!r} needs `path`")
    elif i.kind == "mim":
        report = init_from_mim(model, i.path)
    else:
        report = init_from_run(model, i.path)
    if out is not None:
        dist.info(report.summary())
        if dist.is_main():
            atomic_write_text(Path(out) / "init_report.json", json.dumps(report.to_dict(), indent=2))
    return report
