"""The convolutional stem (`model.stem: conv`): elastic width, exact extraction, counts, errors."""

import pytest
import torch
from pydantic import ValidationError
from timm.models.vision_transformer import VisionTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import TASKS, tiny_space
from ufo.arch import default_stem_channels
from ufo.nn import SuperViT, extract
from ufo.nn.stem import ConvStemEmbed, ElasticConvStem

SPACE = tiny_space(stem="conv", patch_size=4)
torch.manual_seed(0)
MODEL = SuperViT(SPACE).eval()
with torch.no_grad():
    for blk in MODEL.blocks:
        blk.mlp.router_logits.normal_()
        blk.mlp.mix_logits.normal_()
    for m in MODEL.patch_embed.stem:  # non-trivial GroupNorm affine parameters
        if isinstance(m, torch.nn.GroupNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_()
X = torch.randn(3, 3, 16, 16)


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_default_channels_double_up_to_the_width():
    assert default_stem_channels(8, 96) == [24, 48, 96]
    assert SPACE.stem_channels == default_stem_channels(4, 32) == [16, 32]
    assert isinstance(MODEL.patch_embed, ElasticConvStem)


@pytest.mark.parametrize("seed", range(6))
def test_conv_stem_extraction_is_exact_with_exact_counts(seed):
    arch = SPACE.sample(seed)
    for task in TASKS:
        sub = extract(MODEL, arch, task)
        assert isinstance(sub, VisionTransformer) and isinstance(sub.patch_embed, ConvStemEmbed)
        assert type(sub.patch_embed).__module__ == "ufo.nn.stem"
        assert all(
            type(m).__module__.startswith("torch.nn")
            for m in sub.patch_embed.children()
            if not isinstance(m, torch.nn.Sequential)
        )
        MODEL.set_arch(arch)
        with torch.no_grad():
            assert (sub(X) - MODEL(X, task)).abs().max().item() <= 1e-5
        assert _n_params(sub) == SPACE.num_params(arch, task)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            sub(X[:1])
        assert fc.get_total_flops() == SPACE.flops(arch, task)
    multi = extract(MODEL, arch, TASKS)
    MODEL.set_arch(arch)
    with torch.no_grad():
        for task in TASKS:
            assert (multi(X, task) - MODEL(X, task)).abs().max().item() <= 1e-5
    assert _n_params(multi) == SPACE.num_params(arch, TASKS)


def test_tokens_depend_only_on_their_own_image():
    """GroupNorm, not BatchNorm: in training mode too, a row's tokens ignore the rest of the batch."""
    MODEL.train()
    try:
        with torch.no_grad():
            together = MODEL.patch_embed(X)
            alone = torch.cat([MODEL.patch_embed(X[i : i + 1]) for i in range(len(X))])
    finally:
        MODEL.eval()
    assert torch.allclose(together, alone, atol=1e-6)


def test_every_stem_parameter_gets_a_gradient():
    model = SuperViT(SPACE)
    model.set_arch(SPACE.smallest())
    out = model(X, "cls")
    (out * torch.randn_like(out)).sum().backward()  # a plain sum of LayerNorm outputs has no gradient
    for name, p in model.patch_embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    k = SPACE.smallest().embed_dim
    assert model.patch_embed.proj.weight.grad[k:].abs().sum() == 0  # channels past the active width


def test_bad_stem_settings_name_the_field():
    with pytest.raises(ValidationError, match="power-of-two patch_size"):
        tiny_space(stem="conv", patch_size=3, img_size=15)
    with pytest.raises(ValidationError, match="stem_channels"):
        tiny_space(stem="conv", stem_channels=[8, 16, 32])
    with pytest.raises(ValidationError, match="stem is 'patch'"):
        tiny_space(stem_channels=[8, 16])


def test_conv_stem_subnet_exports_to_onnx_with_parity(tmp_path):
    import onnxruntime as ort

    arch = SPACE.sample(3)
    sub = extract(MODEL, arch, "signs")
    x = torch.randn(2, 3, 16, 16)
    batch = torch.export.Dim("batch", min=1, max=64)
    prog = torch.onnx.export(
        sub,
        (x,),
        dynamo=True,
        opset_version=18,
        input_names=["x"],
        output_names=["y"],
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    prog.save(str(tmp_path / "stem.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "stem.onnx"), providers=["CPUExecutionProvider"])
    x5 = torch.randn(5, 3, 16, 16)
    (y,) = sess.run(None, {"x": x5.numpy()})
    with torch.no_grad():
        assert abs(torch.from_numpy(y) - sub(x5)).max().item() <= 1e-4


def test_timm_init_lists_the_conv_stem_as_left_at_init():
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from ufo.train.init import init_from_timm

    src = TimmViT(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, mlp_ratio=2.0, num_classes=0)
    vit = SuperViT(SPACE)
    report = init_from_timm(vit, src.state_dict())
    assert "patch_embed.proj.weight" in report.unused_source
    assert any(k.startswith("patch_embed.stem.") for k in report.uninitialised)
    assert any("stem is 'conv'" in n for n in report.notes)
    assert "blocks.0.attn.qkv.weight" not in report.uninitialised
