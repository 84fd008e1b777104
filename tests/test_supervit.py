import pytest
import torch

from helpers import TASKS, tiny_space
from ufo.errors import ArchError, TaskError
from ufo.nn import SuperViT


def _grads_by_kind(model: SuperViT):
    return {n: p.grad for n, p in model.named_parameters()}


def test_active_path_gets_gradients_and_absent_tasks_do_not():
    space = tiny_space()
    model = SuperViT(space).train()
    arch = space.largest()
    arch = arch.model_copy(
        update={"paths": {"cls": ["task", "mix", "shared"], "faces": ["shared"] * 3, "signs": ["task"] * 3}}
    )
    model.set_arch(arch)
    x = torch.randn(6, 3, 16, 16)
    ids = torch.tensor([0, 0, 1, 1, 0, 1])  # cls and faces only: signs is absent
    model(x, ids).pow(2).sum().backward()
    g = _grads_by_kind(model)
    for name, grad in g.items():
        absent_task = ".experts.signs." in name
        unused_expert = ".experts.faces." in name  # faces routes to shared everywhere
        cls_expert_unused = "blocks.2.mlp.experts.cls." in name  # cls is shared in block 2
        router = "router_logits" in name  # routes are fixed by the arch
        mix = "mix_logits" in name and not name.startswith("blocks.1.")
        if absent_task or unused_expert or cls_expert_unused or router or mix:
            assert grad is None, f"{name} should get no gradient"
        else:
            assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
    # only cls (row 0) mixes in block 1, so only its mix logits move
    assert g["blocks.1.mlp.mix_logits"][0].abs().sum() > 0 and g["blocks.1.mlp.mix_logits"][1:].abs().sum() == 0


def test_sliced_weights_get_gradient_only_on_the_active_slice():
    space = tiny_space()
    model = SuperViT(space).train()
    arch = space.smallest()
    model.set_arch(arch)
    out = model(torch.randn(2, 3, 16, 16), "cls")
    (out * torch.randn_like(out)).sum().backward()  # a plain sum of LayerNorm outputs has no gradient
    w = model.blocks[0].attn.qkv.weight.grad.view(3, 3, 8, 32)
    assert w[:, :1, :, :16].abs().sum() > 0
    assert w[:, 1:].abs().sum() == 0 and w[..., 16:].abs().sum() == 0
    assert model.blocks[1].norm1.weight.grad is None  # beyond the active depth
    assert model.blocks[0].mlp.shared.fc1.weight.grad[16:].abs().sum() == 0  # hidden = 16 of 64


def test_router_gets_gradient_through_gumbel_in_training():
    space = tiny_space()
    model = SuperViT(space).train()
    model.set_temperature(0.5)
    out = model(torch.randn(4, 3, 16, 16), "faces")
    (out * torch.randn_like(out)).sum().backward()  # a plain sum of LayerNorm outputs has no gradient
    for blk in model.blocks:
        g = blk.mlp.router_logits.grad
        assert g[1].abs().sum() > 0 and g[0].abs().sum() == 0 and g[2].abs().sum() == 0


def test_eval_computes_only_the_chosen_path(monkeypatch):
    space = tiny_space()
    model = SuperViT(space).eval()
    arch = space.largest().model_copy(update={"paths": {t: ["shared"] * 3 for t in TASKS}})
    model.set_arch(arch)
    calls = []
    for blk in model.blocks:
        for t, e in blk.mlp.experts.items():
            e.register_forward_hook(lambda *a, t=t: calls.append(t))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), "cls")
    assert calls == []
    model.set_arch(arch.model_copy(update={"paths": {**arch.paths, "cls": ["task"] * 3}}))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16), "signs")
        model(torch.randn(2, 3, 16, 16), "cls")
    assert calls == ["cls"] * 3


@pytest.mark.parametrize("training", [False, True])
def test_mixed_batch_equals_each_task_alone(training):
    space = tiny_space()
    model = SuperViT(space)
    model.train(training)
    model.set_arch(space.sample(7))  # fixed paths: no Gumbel noise, so train and eval are deterministic
    x = torch.randn(7, 3, 16, 16)
    ids = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    mixed = model(x, ids)
    for t in range(3):
        rows = (ids == t).nonzero().flatten()
        torch.testing.assert_close(mixed[rows], model(x[rows], t), atol=1e-5, rtol=0)


def test_feature_width_follows_arch():
    space = tiny_space()
    model = SuperViT(space).eval()
    model.set_arch(space.smallest())
    assert model(torch.randn(2, 3, 16, 16), "cls").shape == (2, 16)
    assert model.forward_features(torch.randn(2, 3, 16, 16), "cls").shape == (2, 17, 16)


def test_routes_and_router_state():
    model = SuperViT(tiny_space())
    with torch.no_grad():
        model.blocks[1].mlp.router_logits[2] = torch.tensor([0.0, 0.0, 5.0])
    routes = model.routes()
    assert set(routes) == set(TASKS) and all(len(r) == 3 for r in routes.values())
    assert routes["signs"][1] == "mix"
    assert len(model.router_state()["cls"]) == 3


def test_bad_task_and_arch_errors():
    space = tiny_space()
    model = SuperViT(space)
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(TaskError, match="unknown task 'dogs'.*cls"):
        model(x, "dogs")
    with pytest.raises(TaskError, match="out of range"):
        model(x, 7)
    with pytest.raises(TaskError, match=r"task ids must lie in \[0, 3\)"):
        model(x, torch.tensor([0, 3]))
    with pytest.raises(TaskError, match="3 task ids for a batch of 2"):
        model(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ArchError, match="embed_dim=40"):
        model.set_arch(space.largest().model_copy(update={"embed_dim": 40}))


def test_drop_path_in_training_only():
    space = tiny_space()
    model = SuperViT(space, drop_path_rate=0.5)
    model.set_arch(space.largest())
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x, "cls"), model(x, "cls"))
    model.train()
    torch.manual_seed(1)
    a = model(x, "cls")
    torch.manual_seed(2)
    assert not torch.allclose(a, model(x, "cls"))
