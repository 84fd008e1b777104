import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.models.vision_transformer import VisionTransformer
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from helpers import TASKS, archs, tiny_space
from ufo.errors import ArchError
from ufo.nn import SuperViT, extract
from ufo.nn.elastic import ElasticLinear

SPACE = tiny_space()
MODEL = SuperViT(SPACE).eval()
with torch.no_grad():  # random router and mix logits, so argmax routes and mix weights are not trivial
    for blk in MODEL.blocks:
        blk.mlp.router_logits.normal_()
        blk.mlp.mix_logits.normal_()
X = torch.randn(3, 3, 16, 16)
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


ELASTIC_MODULES = {"ufo.nn.elastic", "ufo.nn.attention", "ufo.nn.mlp", "ufo.nn.moe", "ufo.nn.vit"}


def _no_elastic_code(m: torch.nn.Module) -> bool:
    return not any(type(x).__module__ in ELASTIC_MODULES for x in m.modules())


@SETTINGS
@given(arch=archs(SPACE))
def test_single_task_extraction_is_exact(arch):
    MODEL.set_arch(arch)
    for task in TASKS:
        sub = extract(MODEL, arch, task)
        assert isinstance(sub, VisionTransformer) and _no_elastic_code(sub)
        with torch.no_grad():
            diff = (sub(X) - MODEL(X, task)).abs().max().item()
        assert diff <= 1e-5
        assert _n_params(sub) == SPACE.num_params(arch, task)


@SETTINGS
@given(arch=archs(SPACE), k=st.integers(2, 3))
def test_multi_task_extraction_is_exact(arch, k):
    tasks = TASKS[:k]
    MODEL.set_arch(arch)
    sub = extract(MODEL, arch, tasks)
    assert _no_elastic_code(sub) and not any(isinstance(m, ElasticLinear) for m in sub.modules())
    with torch.no_grad():
        for task in tasks:
            assert (sub(X, task) - MODEL(X, task)).abs().max().item() <= 1e-5
    assert _n_params(sub) == SPACE.num_params(arch, tasks)


def test_timm_names_on_the_shared_path():
    arch = SPACE.largest().model_copy(update={"paths": {"cls": ["shared"] * 3}})
    names = set(extract(MODEL, arch, "cls").state_dict())
    for expected in [
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.bias",
        "blocks.2.mlp.fc1.weight",
        "blocks.2.mlp.fc2.bias",
        "norm.weight",
        "pos_embed",
        "cls_token",
        "patch_embed.proj.weight",
    ]:
        assert expected in names
    # the supernet's shared expert keeps the same leaf names
    assert "blocks.0.mlp.shared.fc1.weight" in MODEL.state_dict()


def test_multi_task_keeps_shared_weights_once():
    arch = SPACE.largest().model_copy(
        update={"paths": {"cls": ["shared"] * 3, "faces": ["task"] * 3, "signs": ["mix"] * 3}}
    )
    sub = extract(MODEL, arch, TASKS)
    blk = sub.blocks[0].mlp
    assert blk.shared is not None and set(blk.experts) == {"faces", "signs"}
    sub2 = extract(MODEL, arch, ["cls", "faces"])
    assert set(sub2.blocks[0].mlp.experts) == {"faces"}


def test_unset_paths_use_the_frozen_router_choice():
    arch = SPACE.largest().model_copy(update={"paths": {}})
    MODEL.set_arch(arch)
    routes = MODEL.routes()
    sub = extract(MODEL, arch, "faces")
    assert sub.ufo_arch.paths["faces"] == routes["faces"]
    with torch.no_grad():
        assert (sub(X) - MODEL(X, "faces")).abs().max() <= 1e-5


@pytest.mark.parametrize("seed", range(4))
def test_analytic_flops_match_torch_flop_counter(seed):
    arch = SPACE.sample(seed)
    sub = extract(MODEL, arch, "signs")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        sub(X[:1])
    assert fc.get_total_flops() == SPACE.flops(arch, "signs")


def test_extract_errors():
    with pytest.raises(ArchError, match="embed_dim=8"):
        extract(MODEL, SPACE.largest().model_copy(update={"embed_dim": 8}), "cls")
    with pytest.raises(Exception, match="unknown task 'dogs'"):
        extract(MODEL, SPACE.largest(), "dogs")
