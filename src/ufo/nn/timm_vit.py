"""`timm.create_model("ufo_vit", **kwargs)`: the ViT of one extracted task path, from timm's registry.

timm's `VisionTransformer` takes one `num_heads` and one `mlp_ratio` for all blocks, while an
extracted UFO subnet has its own per block (and a block on the mix path has an FFN twice as wide).
`ufo_vit` builds timm's VisionTransformer and gives each block its own `Attention` and `Mlp`. The
module is still timm's class with timm's parameter names (`blocks.{i}.attn.qkv`, `mlp.fc1`, ...),
so a task model's backbone loads into it unchanged. `vit_kwargs(space, arch, task)` gives the
kwargs of one task's path, and `ufo.nn.extract.build_vit` is built from them.

Importing this module registers `ufo_vit`. Any `ufo.nn` import does that, and so does `import ufo`
when timm is already imported (`import ufo` alone does not import timm: it takes seconds).

`make_pretrained_cfg(...)` is timm's description of a model's input (size, mean, std, resize mode), so
that `timm.data.resolve_model_data_config(model)` returns UFO's real preprocessing: resize the
whole image to (H, W) bilinear (timm's `squash` crop mode with `crop_pct` 1.0), then mean/std.

With `pretrained=True`, `timm.create_model("local-dir:DIR", pretrained=True)` loads a folder
written by `ufo.deploy.save_pretrained`: the backbone, plus a classification head as timm's `head`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import Attention, Mlp
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer

from ufo.arch import Arch, SearchSpace, as_hw, hidden_dim
from ufo.nn.stem import ConvStemEmbed

__all__ = ["create_vit", "make_pretrained_cfg", "ufo_vit", "vit_kwargs"]

NAME = "ufo_vit"
DEFAULT_MEAN = DEFAULT_STD = (0.5, 0.5, 0.5)  # ufo.data.transforms' defaults
_HEAD = re.compile(r"heads\.[^.]+\.fc\.(weight|bias)")


def make_pretrained_cfg(
    input_size: tuple[int, int],
    in_chans: int,
    mean: Sequence[float],
    std: Sequence[float],
    num_classes: int = 0,
    fixed_input_size: bool = True,
    stem: str = "patch",
) -> dict[str, Any]:
    """timm's pretrained_cfg for a model whose input is the whole image resized to `input_size`
    (height, width), bilinear, then normalised per channel (one mean/std value applies to all)."""

    def per_channel(v: Sequence[float]) -> tuple[float, ...]:
        return tuple(float(x) for x in (list(v) * in_chans if len(v) == 1 else v))

    return dict(
        architecture=NAME,
        input_size=(in_chans, *as_hw(input_size)),
        mean=per_channel(mean),
        std=per_channel(std),
        num_classes=num_classes,
        interpolation="bilinear",
        crop_pct=1.0,
        crop_mode="squash",
        fixed_input_size=fixed_input_size,
        classifier="head",
        first_conv="patch_embed.stem.0" if stem == "conv" else "patch_embed.proj",
    )


default_cfgs = {NAME: make_pretrained_cfg((224, 224), 3, DEFAULT_MEAN, DEFAULT_STD)}  # read by register_model


def vit_kwargs(space: SearchSpace, arch: Arch, task: str) -> dict[str, Any]:
    """`ufo_vit`'s kwargs for `task`'s path through `arch` (its paths fixed): JSON-ready values."""
    e = arch.embed_dim
    h, w = space.input_size(task)
    kw: dict[str, Any] = dict(
        img_size=h if h == w else [h, w],
        patch_size=space.patch_size,
        in_chans=space.in_chans,
        embed_dim=e,
        depth=arch.depth,
        num_heads=list(arch.num_heads),
        head_dim=space.head_dim,
        mlp_hidden_dim=[
            hidden_dim(e, r) * (2 if arch.paths[task][i] == "mix" else 1) for i, r in enumerate(arch.mlp_ratio)
        ],
        qkv_bias=space.qkv_bias,
    )
    if space.stem != "patch":
        kw.update(stem=space.stem, stem_channels=list(space.stem_channels))
    return kw


def _per_block(value: Any, depth: int, what: str) -> list:
    values = list(value) if isinstance(value, Sequence) else [value] * depth
    if len(values) != depth:
        raise ValueError(f"{what} has {len(values)} values for depth {depth}")
    return values


def create_vit(
    img_size: int | Sequence[int] = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    num_classes: int = 0,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int | Sequence[int] = 3,
    mlp_ratio: float | Sequence[float] = 4.0,
    mlp_hidden_dim: Sequence[int] | None = None,
    head_dim: int | None = None,
    qkv_bias: bool = True,
    stem: str = "patch",
    stem_channels: Sequence[int] = (),
    weight_init: str = "",
    **kwargs: Any,
) -> VisionTransformer:
    """timm's VisionTransformer with per-block heads (`num_heads`, each `head_dim` wide, default
    embed_dim // heads) and FFN widths (`mlp_hidden_dim`, else round(embed_dim * `mlp_ratio`)), and
    UFO's conv stem when `stem` is "conv". Other kwargs go to VisionTransformer; its blocks' attention
    and FFN are rebuilt with `qkv_bias` only. `weight_init` "skip" leaves the weights uninitialised."""
    heads = _per_block(num_heads, depth, "num_heads")
    widths = (
        _per_block(mlp_hidden_dim, depth, "mlp_hidden_dim")
        if mlp_hidden_dim is not None
        else [hidden_dim(embed_dim, r) for r in _per_block(mlp_ratio, depth, "mlp_ratio")]
    )
    size = as_hw(img_size)
    vit = VisionTransformer(
        img_size=size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=1,
        mlp_ratio=1.0,  # blocks replaced below
        qkv_bias=qkv_bias,
        weight_init="skip",
        **kwargs,
    )
    if stem == "conv":
        vit.patch_embed = ConvStemEmbed(size, patch_size, in_chans, embed_dim, stem_channels)
    elif stem != "patch":
        raise ValueError(f"stem {stem!r}: expected patch or conv")
    for blk, h, width in zip(vit.blocks, heads, widths):
        blk.attn = Attention(embed_dim, h, attn_head_dim=head_dim, qkv_bias=qkv_bias)
        blk.mlp = Mlp(embed_dim, width)
    if weight_init != "skip":
        vit.init_weights(weight_init)
    return vit


def task_model_weights(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """A task model's weights (`backbone.*`, `heads.{task}.*`) as `ufo_vit`'s: the backbone without
    its prefix, and a classification head as `head` when the model has one. Others pass unchanged."""
    if not any(k.startswith("backbone.") for k in state_dict):
        return state_dict
    out = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
    fc = {m.group(1): v for k, v in state_dict.items() if (m := _HEAD.fullmatch(k))}
    if getattr(model, "num_classes", 0) and len(fc) == 2:
        out["head.weight"], out["head.bias"] = fc["weight"], fc["bias"]
    return out


@register_model
def ufo_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """An extracted UFO ViT: `create_vit`'s kwargs (per-block `num_heads`, `mlp_hidden_dim` or
    `mlp_ratio`, `head_dim`, `img_size` as one side or [height, width], ...). Its pretrained_cfg
    follows `img_size` and `in_chans`; weights come only from a `local-dir:` folder."""
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    if "img_size" in kwargs or "in_chans" in kwargs:
        size = as_hw(kwargs.get("img_size", 224))
        overlay.setdefault("input_size", (kwargs.get("in_chans", 3), *size))
    if kwargs.get("stem") == "conv":
        overlay.setdefault("first_conv", "patch_embed.stem.0")
    return build_model_with_cfg(
        create_vit, NAME, pretrained, pretrained_cfg_overlay=overlay, pretrained_filter_fn=task_model_weights, **kwargs
    )
