"""Tiny search spaces and hypothesis strategies shared by the core tests."""

from __future__ import annotations

from hypothesis import strategies as st

from ufo.arch import PATHS, Arch, SearchSpace

TASKS = ["cls", "faces", "signs"]


def tiny_space(**overrides) -> SearchSpace:
    kw = dict(tasks=TASKS, depth=[1, 2, 3], embed_dim=[16, 24, 32], num_heads=[1, 2, 3], mlp_ratio=[1.0, 1.5, 2.0],
              head_dim=8, img_size=16, patch_size=4)
    kw.update(overrides)
    return SearchSpace(**kw)


@st.composite
def archs(draw, space: SearchSpace, with_paths: bool = True) -> Arch:
    d = draw(st.sampled_from(space.depth))
    paths = {t: draw(st.lists(st.sampled_from(PATHS), min_size=d, max_size=d)) for t in space.tasks} if with_paths else {}
    return Arch(
        depth=d,
        embed_dim=draw(st.sampled_from(space.embed_dim)),
        num_heads=draw(st.lists(st.sampled_from(space.num_heads), min_size=d, max_size=d)),
        mlp_ratio=draw(st.lists(st.sampled_from(space.mlp_ratio), min_size=d, max_size=d)),
        paths=paths,
    )
