"""SimMIM pre-training (`train.stage: pretrain_mim`): masked image modelling on every task's images.

Large square patches (`mim.mask_patch_size`, a multiple of the model's patch size) are hidden at
random (`mim.mask_ratio`); a learnable mask token replaces their patch embeddings; the encoder
runs at the largest arch with every FFN on the shared path; a linear head predicts each patch's
pixels, and the loss is the L1 error on the masked pixels only (SimMIM, Xie et al. 2022). Labels
are never read. `MimStage` plugs this into the Trainer; everything else (sampler, transforms,
optimiser groups, LR schedule, exact-resume checkpoints, logging, non-finite handling, the final
`model.safetensors`) is the Trainer's.

Tasks may differ in input size (square or not): the images of each size get masks on their own
grid (the mask patch must divide every size), and the loss is one L1 over the masked pixels of all.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from timm.layers import trunc_normal_
from torch import nn

from ufo.arch import ImageSize, as_hw
from ufo.config import Config
from ufo.errors import ConfigError
from ufo.model import UFOModel
from ufo.nn.vit import Images, SuperViT
from ufo.train.engine import Skip, Terms, finite_backward
from ufo.train.stage import Batch, Stage


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in the patch embedding's row-major order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def random_mask(
    batch: int,
    img_size: ImageSize,
    patch_size: int,
    mask_patch_size: int,
    ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, num_patches) bool, True = hidden, for images of `img_size` (one side, or (height, width)):
    ceil(ratio * n) of the n = rows x cols mask patches per image, each covering
    (mask_patch_size / patch_size)^2 model patches. Draws from torch's RNG, so a resumed run draws
    the same masks."""
    (h, w), scale = as_hw(img_size), mask_patch_size // patch_size
    rows, cols = h // mask_patch_size, w // mask_patch_size
    n = rows * cols
    chosen = torch.rand(batch, n, generator=generator).argsort(1)[:, : math.ceil(n * ratio)]
    mask = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, chosen, True)
    return mask.view(batch, rows, cols).repeat_interleave(scale, 1).repeat_interleave(scale, 2).flatten(1)


def masked_l1_sums(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1 error summed over the masked patches' pixels, their count), in float32: under autocast
    `pred` is bf16, and rounding the target to it would add a noise floor of about 1e-2."""
    err = (pred.float() - target.float()).abs() * mask.unsqueeze(-1)
    return err.sum(), mask.sum() * pred.shape[-1]


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 error summed over the masked patches' pixels, divided by their count (SimMIM's loss)."""
    err, count = masked_l1_sums(pred, target, mask)
    return err / count.clamp_min(1)


def mask_patch_for(cfg: Config) -> int:
    """The mask patch size in pixels: `mim.mask_patch_size`, else the default (2 x patch size) where
    it divides the base size and every task's input size, else the patch size."""
    sizes = [cfg.model.img_size, *(cfg.input_size(t) for t in cfg.task_names)]
    return min(cfg.mim.patch(s, cfg.model.patch_size) for s in sizes)


class SimMIM(nn.Module):
    """A UFOModel's backbone as a SimMIM encoder, plus the mask token and the pixel head.

    The whole UFOModel is held (its task heads are never used) so that the run ends with a normal
    `ufo_model` file. The mask token is 1-d, so the optimiser's groups leave it undecayed.
    """

    def __init__(self, ufo: UFOModel, mask_patch_size: int, mask_ratio: float) -> None:
        super().__init__()
        s = ufo.space
        if mask_patch_size % s.patch_size:
            raise ConfigError(
                f"mim.mask_patch_size: {mask_patch_size} must be a multiple of the patch size {s.patch_size}"
            )
        for where, (h, w) in [
            ("model.img_size", s.input_size()),
            *((f"tasks.{t}.img_size", s.input_size(t)) for t in s.tasks),
        ]:
            if h % mask_patch_size or w % mask_patch_size:
                raise ConfigError(
                    f"mim.mask_patch_size: {mask_patch_size} does not divide {where} {h}x{w} (HxW); "
                    "choose a mask patch that divides every task's input size"
                )
        self.ufo = ufo
        self.mask_patch_size, self.mask_ratio = mask_patch_size, mask_ratio
        self.mask_token = nn.Parameter(torch.zeros(s.max_embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.pixel_head = nn.Linear(s.max_embed_dim, s.patch_size**2 * s.in_chans)

    @property
    def backbone(self) -> SuperViT:
        return self.ufo.backbone

    @property
    def heads(self) -> nn.ModuleDict:
        return self.ufo.heads

    @property
    def tasks(self) -> list[str]:
        return self.ufo.tasks

    def random_mask(self, batch: int | Images) -> torch.Tensor | list[torch.Tensor]:
        """Masks of a batch: `batch` images at the base size, one (B, C, H, W) tensor at its own
        size, or one mask per chunk of a list of input sizes."""
        s = self.ufo.space
        if isinstance(batch, int):
            return random_mask(batch, s.input_size(), s.patch_size, self.mask_patch_size, self.mask_ratio)
        if isinstance(batch, torch.Tensor):
            size = (batch.shape[-2], batch.shape[-1])
            return random_mask(batch.shape[0], size, s.patch_size, self.mask_patch_size, self.mask_ratio)
        return [cast(torch.Tensor, self.random_mask(c)) for c in batch]

    def predict(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pixels of every patch, (B, N, patch^2 * C), seeing only the unmasked patches."""
        feats = self.backbone.forward_features(x, 0, mask.to(x.device), self.mask_token)  # every path is shared
        return self.pixel_head(feats[:, 1:])

    def forward(self, x: Images, mask: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The masked-pixel L1 loss of a batch: one tensor and its mask, or chunks of different input
        sizes and one mask each (one L1 over all their masked pixels)."""
        p = self.ufo.space.patch_size
        if isinstance(x, torch.Tensor):
            m = cast(torch.Tensor, mask).to(x.device)
            return masked_l1(self.predict(x, m), patchify(x, p), m)
        sums = [
            masked_l1_sums(self.predict(c, m.to(c.device)), patchify(c, p), m.to(c.device))
            for c, m in zip(x, cast(list[torch.Tensor], mask), strict=True)
        ]
        count = cast(torch.Tensor, sum(n for _, n in sums))
        return cast(torch.Tensor, sum(e for e, _ in sums)) / count.clamp_min(1)


class MimStage(Stage):
    """The stage whose module is `SimMIM` around the model and whose one pass is the masked-pixel
    loss, at the largest arch with every FFN on the shared path."""

    evaluates = False  # the task heads are never trained, so their metrics would say nothing
    no_fsdp = ""

    def __init__(self, cfg: Config, model: UFOModel) -> None:
        largest = model.space.largest()
        super().__init__(
            cfg, model, largest.model_copy(update={"paths": {t: ["shared"] * largest.depth for t in model.tasks}})
        )
        self.mim = SimMIM(model, mask_patch_for(cfg), cfg.mim.mask_ratio)

    @property
    def module(self) -> SimMIM:
        return self.mim

    def step_module(self) -> nn.Module:
        return self.mim  # every path is shared

    def backward(self, forward: nn.Module, batch: Batch, step: int, amp: torch.autocast) -> Terms | Skip:
        x, _, _ = batch  # labels are never used; x is a list of chunks when input sizes differ
        mask = self.mim.random_mask(x)
        with amp:
            loss = forward(x, mask) * self.batch_share  # uneven rows over the ranks: see Stage.share
        return finite_backward({"mim": loss}, loss, "the masked-pixel (MIM) objective")

    def shipped(self, module: nn.Module) -> UFOModel:
        """The UFOModel holding the pre-trained backbone."""
        return cast(SimMIM, module).ufo
