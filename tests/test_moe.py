"""TaskFFN's batched experts against the one-task-at-a-time loop, and a mixed batch under torch.compile."""

import copy

import pytest
import torch

from helpers import TASKS, tiny_space
from ufo.nn import Layout, SuperViT
from ufo.nn.batched_linear import batched_linear

PATHS_FIXED = {"cls": ["task", "mix", "shared"], "faces": ["shared", "task", "task"], "signs": ["task", "task", "mix"]}


def _model(paths: dict | None, train: bool) -> SuperViT:
    torch.manual_seed(0)
    space = tiny_space()
    model = SuperViT(space).train(train)
    arch = space.largest()
    model.set_arch(arch.model_copy(update={"paths": paths if paths is not None else {}}))
    for blk in model.blocks:  # large enough logits that routes and mixes differ between tasks
        torch.nn.init.normal_(blk.mlp.router_logits, std=1.0)
        torch.nn.init.normal_(blk.mlp.mix_logits, std=1.0)
    return model


def _run(model: SuperViT, batched: bool, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    for blk in model.blocks:
        blk.mlp.batched = batched
    torch.manual_seed(1)  # the same Gumbel draws on both sides
    out = model(x, ids)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "paths,train",
    [
        ({t: ["task"] * 3 for t in TASKS}, True),  # every task on its expert: the pure batched path
        (PATHS_FIXED, True),  # shared, task and mix side by side
        (PATHS_FIXED, False),
        (None, True),  # routed by Gumbel-Softmax draws
    ],
)
def test_batched_experts_match_the_loop(paths, train):
    model = _model(paths, train)
    x = torch.randn(7, 3, 16, 16)
    ids = torch.tensor([2, 0, 1, 0, 2, 0, 2])  # uneven segments: 3, 1, 3 rows, unsorted
    out_b, g_b = _run(model, True, x, ids)
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    out_l, g_l = _run(ref, False, x, ids)
    torch.testing.assert_close(out_b, out_l, atol=1e-5, rtol=1e-5)
    assert g_b.keys() == g_l.keys()
    for n in g_b:
        assert (g_b[n] is None) == (g_l[n] is None), n
        if g_b[n] is not None:
            torch.testing.assert_close(g_b[n], g_l[n], atol=1e-5, rtol=1e-5, msg=n)


def test_absent_tasks_experts_get_no_gradient_when_batched():
    model = _model({t: ["task"] * 3 for t in TASKS}, True)
    _, g = _run(model, True, torch.randn(4, 3, 16, 16), torch.tensor([0, 2, 2, 0]))
    assert all(g[n] is None for n in g if ".experts.faces." in n)
    assert all(g[n] is not None for n in g if ".experts.cls." in n or ".experts.signs." in n)


def test_layout_matches_task_ids():
    model = _model(PATHS_FIXED, False)
    x, ids = torch.randn(5, 3, 16, 16), torch.tensor([1, 0, 2, 0, 1])
    layout = model.layout(ids, 5)
    assert isinstance(layout, Layout) and layout.segments == ((0, 0, 2), (1, 2, 4), (2, 4, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(x, layout), model(x, ids))


@pytest.mark.parametrize(
    "batched,paths,train",
    [
        (False, PATHS_FIXED, True),
        (True, PATHS_FIXED, True),
        (False, None, True),  # Gumbel draws of the routers
        (False, None, False),  # eval: the routers' argmax, read by layout() (Layout.paths)
        (True, None, False),
        (True, None, True),
    ],
)
def test_mixed_batch_compiles_to_one_graph(batched, paths, train):
    model = _model(paths, train)
    for blk in model.blocks:
        blk.mlp.batched = batched
    x, ids = torch.randn(5, 3, 16, 16), torch.tensor([1, 0, 2, 0, 1])
    layout = model.layout(ids, 5)
    assert (layout.paths is not None) == (paths is None and not train)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(x, layout)
    finally:
        torch._dynamo.reset()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_eval_paths_read_beforehand_give_the_routers_choice():
    """Layout.paths holds each block's router argmax (fixed paths kept): the same output as reading
    the argmax inside each block."""
    model = _model({"cls": ["task", "mix", "shared"]}, False)  # cls fixed, the other tasks routed
    x, ids = torch.randn(6, 3, 16, 16), torch.tensor([2, 0, 1, 0, 2, 1])
    layout = model.layout(ids, 6)
    assert layout.paths is not None and [row[0] for row in layout.paths] == [1, 2, 0]
    routes = model.routes()
    assert [[r[i] for r in layout.paths] for i in (1, 2)] == [
        [["shared", "task", "mix"].index(p) for p in routes[t]] for t in ("faces", "signs")
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(x, layout), model(x, Layout(layout.segments, layout.order, layout.restore)))


@pytest.mark.parametrize("amp", [False, True])
def test_batched_linear_matches_autograd_and_gives_contiguous_weight_gradients(amp):
    """batched_linear's own backward against autograd through baddbmm, in float32 and under bf16
    autocast (the cast operands are what both differentiate); each expert's weight gradient, a
    view of the stacked one, is contiguous, so autograd keeps it without a copy."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(6, 4, generator=g, requires_grad=True) for _ in range(3)]
    bs = [torch.randn(6, generator=g, requires_grad=True) for _ in range(3)]
    x = torch.randn(3, 5, 4, generator=g, requires_grad=True)
    grads = []
    for fn in (batched_linear, lambda x, w, b: torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = fn(x, torch.stack(ws), torch.stack(bs))
        assert y.dtype == (torch.bfloat16 if amp else torch.float32)
        (y.float() ** 2).sum().backward()
        grads.append([t.grad.clone() for t in (x, *ws, *bs)])
        if fn is batched_linear:
            assert all(w.grad.is_contiguous() for w in ws)
        for t in (x, *ws, *bs):
            t.grad = None
    for mine, ref in zip(*grads, strict=True):
        assert mine.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(mine, ref, rtol=1e-2 if amp else 1e-5, atol=1e-2 if amp else 1e-5)
