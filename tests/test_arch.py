import json

import numpy as np
import pytest

from helpers import TASKS, tiny_space
from ufo.arch import Arch, SearchSpace
from ufo.errors import ArchError


def test_largest_smallest_sample_are_in_space():
    space = tiny_space()
    for arch in [space.largest(), space.smallest(), *(space.sample(s) for s in range(20))]:
        assert space.contains(arch)
    assert space.largest().embed_dim == 32 and space.smallest().depth == 1
    assert space.num_params(space.smallest()) < space.num_params(space.sample(0)) < space.num_params(space.largest())


def test_sample_is_deterministic_and_varies():
    space = tiny_space()
    assert space.sample(3) == space.sample(3)
    assert len({space.sample(s).to_json() for s in range(20)}) > 10


def test_sample_with_routes_uses_them():
    space = tiny_space()
    routes = {t: ["task", "shared", "mix"] for t in TASKS}
    arch = space.sample(1, routes=routes)
    assert all(p == routes[t][: arch.depth] for t, p in arch.paths.items())


def test_json_round_trip(tmp_path):
    space = tiny_space()
    arch = space.sample(5)
    assert Arch.from_json(arch.to_json()) == arch
    assert SearchSpace.from_json(space.to_json()) == space
    arch.save(tmp_path / "a.json")
    assert Arch.load(tmp_path / "a.json") == arch


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("embed_dim", 20, "arch.embed_dim=20"),
        ("depth", 4, "arch.depth=4"),
    ],
)
def test_out_of_space_error_names_field_and_allowed(field, value, needle):
    space = tiny_space()
    arch = space.largest()
    data = arch.model_dump()
    data[field] = value
    if field == "depth":
        data.update(num_heads=[1] * value, mlp_ratio=[1.0] * value, paths={})
    with pytest.raises(ArchError) as e:
        space.check(Arch(**data))
    assert needle in str(e.value) and "allowed values" in str(e.value)


def test_bad_heads_ratio_and_path_are_named():
    space = tiny_space()
    arch = space.smallest()
    with pytest.raises(ArchError, match=r"num_heads\[0\]=5.*\[1, 2, 3\]"):
        space.check(arch.model_copy(update={"num_heads": [5]}))
    with pytest.raises(ArchError, match=r"mlp_ratio\[0\]=3.0"):
        space.check(arch.model_copy(update={"mlp_ratio": [3.0]}))
    with pytest.raises(ArchError, match="'dogs'"):
        space.check(arch.model_copy(update={"paths": {"dogs": ["shared"]}}))
    narrow = tiny_space(paths=["shared", "task"])
    with pytest.raises(ArchError, match=r"paths\['cls'\]\[0\]='mix'"):
        narrow.check(arch.model_copy(update={"paths": {"cls": ["mix"]}}))


def test_malformed_arch_and_file_errors(tmp_path):
    with pytest.raises(ValueError, match="num_heads has 1 entries but depth is 2"):
        Arch(depth=2, embed_dim=16, num_heads=[1], mlp_ratio=[1.0, 1.0])
    (tmp_path / "bad.json").write_text(json.dumps({"depth": 1}))
    with pytest.raises(ArchError, match="bad.json"):
        Arch.load(tmp_path / "bad.json")
    with pytest.raises(ArchError, match="not found"):
        Arch.load(tmp_path / "missing.json")


def test_space_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_space(img_size=15)
    with pytest.raises(ValueError, match="unique"):
        tiny_space(tasks=["a", "a"])
    assert tiny_space(depth=[3, 1, 2, 2]).depth == [1, 2, 3]


def test_encode_is_fixed_length_and_distinguishes_paths():
    space = tiny_space()
    lengths = {space.encode(space.sample(s)).shape for s in range(10)}
    assert lengths == {(2 + 2 * 3 + 2 * 3 * len(TASKS),)}
    a = space.largest()
    b = a.model_copy(update={"paths": {**a.paths, "cls": ["shared"] * a.depth}})
    assert not np.array_equal(space.encode(a), space.encode(b))
    assert np.array_equal(space.encode(a, ["faces"]), space.encode(b, ["faces"]))


def test_num_params_needs_paths():
    space = tiny_space()
    arch = space.largest().model_copy(update={"paths": {}})
    with pytest.raises(ArchError, match="no path for task 'cls'"):
        space.num_params(arch, "cls")
