"""Batch transforms from stored uint8 images to normalised model input.

`build_transform(...)` returns a module that takes uint8 (C, H, W) or (B, C, H, W) and returns
float32 (.., in_chans, S, S):

    resize to the model's input (skipped when already that size; torchvision v2, antialiased)
    -> grayscale lifted to 3 channels, or RGB reduced to 1 (to the model's in_chans)
    -> ToDtype(float32, scale=True) -> [train only] geometric augmentation
    -> Normalize(mean, std) -> [train only] random erasing.

Why the random augmentations are not torchvision's classes: v2 transforms draw one set of
random parameters per call, so on a (B, C, H, W) batch every image would get the same crop and
flip. Here they are written batch-first with per-sample parameters (one `grid_sample` for
rotation and random-resized-crop, index arithmetic for crops, masks for flips and erasing), so a
whole step's batch is augmented in one pass on CPU. They draw from the global torch RNG (or a
`generator` passed to forward), so `torch.manual_seed` makes them repeatable.

Streamed sets are augmented one image at a time in DataLoader workers instead (`SampleTransform`):
the random-resized-crop box is drawn from the file's own size and cut out while decoding (a large
JPEG is then decoded at a reduced DCT scale), the other geometric augmentations run on the small
uint8 result, and normalisation and random erasing run on the batch in the main process (on the
GPU when there is one). Its random draws come from a numpy Generator keyed by (seed, task, step,
slot), so a sample's augmentation does not depend on which worker decoded it.

Augmentation keys (all off by default; choose per task):
- `hflip: bool`: random horizontal flip. Off by default: it is wrong for characters and signs.
- `crop_padding: int`: pad by this many pixels (zeros) and crop back at a random offset.
- `random_resized_crop: bool | float`: random crop of area fraction in [lo, 1] (lo = 0.35, or
  the number given) and aspect ratio in [3/4, 4/3], resized back to the input size.
- `rotation: float`: random rotation in [-deg, +deg].
- `random_erasing: float`: probability of erasing a random rectangle (2-33% of the area) to 0
  after normalisation (the mean colour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ufo.arch import as_hw
from ufo.data.decode import Box, BoxFn
from ufo.data.store import ImageStore
from ufo.errors import ConfigError, DataError

DEFAULT_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
AUGMENT_KEYS = ("hflip", "crop_padding", "random_resized_crop", "random_erasing", "rotation")
_RRC_MIN_SCALE = 0.35  # torchvision's 0.08 destroys 32x32 images
_RRC_RATIO = (3 / 4, 4 / 3)
_ERASE_SCALE, _ERASE_RATIO = (0.02, 0.33), (0.3, 3.3)


def _stats(values: Sequence[float], in_chans: int, what: str) -> list[float]:
    vals = [float(v) for v in (values if isinstance(values, Sequence) else [values])]
    if len(vals) == in_chans:
        return vals
    if len(vals) == 1:
        return vals * in_chans
    if in_chans == 1 and len(vals) == 3:
        return [sum(vals) / 3]
    raise ConfigError(f"{what} has {len(vals)} values but the model takes {in_chans} channels")


def _parse_augment(augment: dict[str, Any] | None) -> dict[str, Any]:
    aug = dict(augment or {})
    unknown = sorted(set(aug) - set(AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"unknown augment key(s) {unknown}; known keys: {', '.join(AUGMENT_KEYS)}")
    out: dict[str, Any] = dict(hflip=bool(aug.get("hflip", False)), crop_padding=int(aug.get("crop_padding", 0) or 0))
    rrc = aug.get("random_resized_crop", False)
    if isinstance(rrc, bool) or rrc is None:
        out["rrc_min"] = _RRC_MIN_SCALE if rrc else None
    else:
        if not 0 < float(rrc) <= 1:
            raise ConfigError(f"augment.random_resized_crop must be true/false or a min area in (0, 1], got {rrc!r}")
        out["rrc_min"] = float(rrc)
    out["erasing"] = float(aug.get("random_erasing", 0.0) or 0.0)
    out["rotation"] = float(aug.get("rotation", 0.0) or 0.0)
    if not 0 <= out["erasing"] <= 1:
        raise ConfigError(f"augment.random_erasing is a probability in [0, 1], got {out['erasing']}")
    if out["crop_padding"] < 0 or out["rotation"] < 0:
        raise ConfigError("augment.crop_padding and augment.rotation must be >= 0")
    return out


class BatchTransform(torch.nn.Module):
    """uint8 (C, H, W) or (B, C, H, W) -> normalised float32 (.., in_chans, H', W'). See the
    module docstring for the steps."""

    def __init__(
        self,
        image_size: int | tuple[int, int],
        mean: Sequence[float] = DEFAULT_MEAN,
        std: Sequence[float] = DEFAULT_STD,
        train: bool = False,
        augment: dict[str, Any] | None = None,
        in_chans: int = 3,
    ):
        super().__init__()
        if in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {in_chans}")
        self.size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.in_chans, self.train_mode = in_chans, train
        self.aug = _parse_augment(augment)
        self.resize = v2.Resize(self.size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.normalize = v2.Normalize(_stats(mean, in_chans, "mean"), _stats(std, in_chans, "std"))

    def extra_repr(self) -> str:
        on = {k: v for k, v in self.aug.items() if v} if self.train_mode else {}
        return f"size={self.size}, in_chans={self.in_chans}, train={self.train_mode}, augment={on}"

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"transform expects an image (C, H, W) or batch (B, C, H, W), got {shape}")
        single = x.ndim == 3
        x = x[None] if single else x
        if x.shape[1] not in (1, 3):
            raise DataError(f"transform expects 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise DataError(f"transform expects uint8 (or float in [0, 1]) images, got {x.dtype}")
        if tuple(x.shape[-2:]) != self.size:
            x = self.resize(x)
        if x.shape[1] != self.in_chans:
            x = x.expand(-1, 3, -1, -1) if self.in_chans == 3 else v2.functional.rgb_to_grayscale(x)
        x = self.to_float(x) if x.dtype == torch.uint8 else x.float()
        if self.train_mode:
            x = self._geometric(x, generator)
        x = self.normalize(x.contiguous())
        if self.train_mode and self.aug["erasing"] > 0:
            x = random_erasing(x, self.aug["erasing"], generator)
        return x[0] if single else x

    def _geometric(self, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        a = self.aug
        if a["rrc_min"] is not None or a["rotation"] > 0:
            x = _affine(x, a["rrc_min"], a["rotation"], g)
        if a["crop_padding"] > 0:
            x = _pad_crop(x, a["crop_padding"], g)
        if a["hflip"]:
            flip = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


def build_transform(
    image_size: int | tuple[int, int],
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    train: bool = False,
    augment: dict[str, Any] | None = None,
    in_chans: int = 3,
) -> BatchTransform:
    """The transform from stored uint8 images to the model's input: `image_size` and `in_chans`
    of the model, normalisation `mean`/`std` (one value or one per channel), and with `train`
    the augmentations named in `augment` (keys in AUGMENT_KEYS; unknown keys are a ConfigError)."""
    return BatchTransform(image_size, mean, std, train, augment, in_chans)


class SampleTransform:
    """One stored image -> uint8 (in_chans, H, W) at the task's input size, with the task's geometric
    augmentations when `train` (crop, rotation, pad-and-crop, flip); the float conversion,
    normalisation and random erasing are left to `post_transform` on the batch."""

    def __init__(
        self,
        image_size: int | tuple[int, int],
        in_chans: int = 3,
        augment: dict[str, Any] | None = None,
        train: bool = False,
    ) -> None:
        if in_chans not in (1, 3):
            raise ConfigError(f"in_chans must be 1 or 3, got {in_chans}")
        self.size, self.in_chans, self.train = as_hw(image_size), in_chans, train
        self.aug = _parse_augment(augment)

    def box(self, rng: np.random.Generator) -> BoxFn | None:
        lo = self.aug["rrc_min"] if self.train else None
        return None if lo is None else (lambda w, h: rrc_box(w, h, lo, rng))

    def __call__(self, store: ImageStore, i: int, rng: np.random.Generator) -> torch.Tensor:
        x = torch.from_numpy(store.read(i, self.size, self.in_chans, self.box(rng)))
        if not self.train:
            return x
        a = self.aug
        if a["rotation"] > 0:
            angle = float(rng.uniform(-a["rotation"], a["rotation"]))
            x = v2.functional.rotate(x, angle, interpolation=v2.InterpolationMode.BILINEAR)
        if a["crop_padding"] > 0:
            p, (h, w) = a["crop_padding"], self.size
            oy, ox = (int(v) for v in rng.integers(0, 2 * p + 1, 2))
            x = F.pad(x, (p, p, p, p))[:, oy : oy + h, ox : ox + w]
        if a["hflip"] and rng.random() < 0.5:
            x = x.flip(-1)
        return x.contiguous()


def post_transform(
    image_size: int | tuple[int, int],
    mean: Sequence[float] = DEFAULT_MEAN,
    std: Sequence[float] = DEFAULT_STD,
    train: bool = False,
    augment: dict[str, Any] | None = None,
    in_chans: int = 3,
) -> BatchTransform:
    """The batch half of a streamed task's transform: uint8 batches from `SampleTransform` ->
    normalised float32, with random erasing when training (the only augmentation left to do)."""
    erasing = _parse_augment(augment)["erasing"] if train else 0.0
    return BatchTransform(image_size, mean, std, train, {"random_erasing": erasing}, in_chans)


def rrc_box(w: int, h: int, lo: float, rng: np.random.Generator) -> Box:
    """A random-resized-crop box of area fraction in [lo, 1] and aspect ratio in [3/4, 4/3] of a
    w x h image (torchvision's RandomResizedCrop rule: 10 tries, then the central crop)."""
    area = w * h
    log_r = (math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(lo, 1.0)
        ratio = math.exp(rng.uniform(*log_r))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return (left, top, left + cw, top + ch)
    ratio = w / h
    if ratio < _RRC_RATIO[0]:  # too tall: full width, the tallest allowed box
        cw, ch = w, min(h, round(w / _RRC_RATIO[0]))
    elif ratio > _RRC_RATIO[1]:  # too wide: full height
        cw, ch = min(w, round(h * _RRC_RATIO[1])), h
    else:
        cw, ch = w, h
    left, top = (w - cw) // 2, (h - ch) // 2
    return (left, top, left + cw, top + ch)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _affine(x: torch.Tensor, rrc_min: float | None, degrees: float, g: torch.Generator | None) -> torch.Tensor:
    """Per-sample random-resized-crop and rotation as one bilinear `grid_sample`.

    The affine map sends output coordinates (normalised to [-1, 1]) to input ones:
    in = centre + S @ (D^-1 R D) @ out, where S scales to the crop, R rotates in pixel space and
    D = diag(W, H) keeps the rotation rigid on non-square images."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3)
    sx, sy = torch.ones(b), torch.ones(b)
    if rrc_min is not None:
        area = _uniform(b, rrc_min, 1.0, g)
        log_r = _uniform(b, math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]), g)
        ratio = torch.exp(log_r)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)  # crop width / image width
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        theta[:, 0, 2] = (1 - sx) * _uniform(b, -1, 1, g)  # crop centre stays inside the image
        theta[:, 1, 2] = (1 - sy) * _uniform(b, -1, 1, g)
    ang = _uniform(b, -degrees, degrees, g) * (math.pi / 180) if degrees > 0 else torch.zeros(b)
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta[:, 0, 0], theta[:, 0, 1] = sx * cos, -sx * sin * (h / w)
    theta[:, 1, 0], theta[:, 1, 1] = sy * sin * (w / h), sy * cos
    # same grid as F.affine_grid(theta, x.shape, align_corners=False), as one matmul (2x faster)
    theta = theta.to(x.device)  # drawn on the CPU (its generator), so a GPU batch gets the same draws
    ys = (torch.arange(h, dtype=torch.float32, device=x.device) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=torch.float32, device=x.device) * 2 + 1) / w - 1
    base = torch.stack([xs.repeat(h), ys.repeat_interleave(w), torch.ones(h * w, device=x.device)], dim=1)  # (HW, 3)
    grid = (base @ theta.transpose(1, 2)).view(b, h, w, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _pad_crop(x: torch.Tensor, pad: int, g: torch.Generator | None) -> torch.Tensor:
    """Zero-pad by `pad` and crop back to (H, W) at a random offset per sample."""
    b, c, h, w = x.shape
    wp = w + 2 * pad
    xp = F.pad(x, (pad, pad, pad, pad)).flatten(2)  # (B, C, (H+2p)(W+2p))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=g)
    offsets = (torch.arange(h)[:, None] * wp + torch.arange(w)[None]).flatten()  # (HW,)
    idx = ((oy * wp + ox)[:, None] + offsets[None]).to(x.device)  # (B, HW): flat index of each kept pixel
    return xp.gather(2, idx[:, None, :].expand(b, c, h * w)).view(b, c, h, w)


def random_erasing(x: torch.Tensor, p: float, g: torch.Generator | None) -> torch.Tensor:
    """With probability p per sample, set one random rectangle to 0 (the mean after Normalize)."""
    b, _, h, w = x.shape
    area = _uniform(b, *_ERASE_SCALE, g) * h * w
    ratio = torch.exp(_uniform(b, math.log(_ERASE_RATIO[0]), math.log(_ERASE_RATIO[1]), g))
    eh = torch.sqrt(area * ratio).round().clamp(1, h).long()
    ew = torch.sqrt(area / ratio).round().clamp(1, w).long()
    y0 = (torch.rand(b, generator=g) * (h - eh + 1)).long()
    x0 = (torch.rand(b, generator=g) * (w - ew + 1)).long()
    on = torch.rand(b, generator=g) < p
    ys, xs = torch.arange(h), torch.arange(w)
    in_y = (ys[None] >= y0[:, None]) & (ys[None] < (y0 + eh)[:, None])  # (B, H)
    in_x = (xs[None] >= x0[:, None]) & (xs[None] < (x0 + ew)[:, None])  # (B, W)
    mask = (in_y[:, :, None] & in_x[:, None, :] & on[:, None, None])[:, None]  # (B, 1, H, W)
    # drawn on the CPU (its generator): a GPU batch (a streamed task's, normalised on the GPU) gets the
    # same rectangles, and masked_fill needs the mask on the batch's device
    return x.masked_fill(mask.to(x.device, non_blocking=True), 0.0)
