"""Latency measurement of extracted subnets on torch-cpu and ONNX Runtime, and latency datasets."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_space
from ufo.errors import ArchError, SearchError
from ufo.search.latency import BACKENDS, LatencyDataset, collect, measure, space_from

SPACE = tiny_space()


@pytest.mark.parametrize("backend", ["torch-cpu", "ort-cpu"])
def test_measure_gives_positive_median_inside_iqr(backend):
    lat = measure(SPACE, SPACE.smallest(), "cls", backend, batch=2, threads=1, repeats=7, warmup=2)
    assert lat.n == 7
    assert 0 < lat.q1_ms <= lat.median_ms <= lat.q3_ms


def test_larger_arch_is_slower_on_torch_cpu():
    space = tiny_space(
        depth=[1, 6],
        embed_dim=[16, 128],
        num_heads=[1, 4],
        mlp_ratio=[1.0, 4.0],
        head_dim=32,
        img_size=32,
        patch_size=4,
    )
    small = measure(space, space.smallest(), "cls", "torch-cpu", batch=4, repeats=15, warmup=3)
    large = measure(space, space.largest(), "cls", "torch-cpu", batch=4, repeats=15, warmup=3)
    assert large.median_ms > 2 * small.median_ms, (small, large)


def test_measure_restores_torch_threads():
    before = torch.get_num_threads()
    measure(SPACE, SPACE.smallest(), "cls", "torch-cpu", threads=1, repeats=2, warmup=0)
    assert torch.get_num_threads() == before


def test_dataset_round_trips_through_json(tmp_path):
    ds = collect(SPACE, "faces", 5, "torch-cpu", seed=3, repeats=3, warmup=1, progress=False)
    assert len(ds) == 5 and ds.archs[0].depth == SPACE.max_depth and ds.archs[1].depth == SPACE.depth[0]
    assert all(list(a.paths) == ["faces"] for a in ds.archs)
    assert len({a.model_dump_json() for a in ds.archs}) == 5
    back = LatencyDataset.load(ds.save(tmp_path / "lat.json"))
    assert back == ds
    assert back.features().shape == (5, len(SPACE.encode(ds.archs[0], ["faces"])) + 2)  # + log params, log FLOPs
    assert (back.targets() > 0).all()
    assert space_from(tmp_path / "lat.json") == SPACE


def test_space_from_config_and_missing_file(tmp_path):
    from ufo.demo import demo_config_path

    assert space_from(demo_config_path()).tasks
    with pytest.raises(SearchError, match="not found"):
        space_from(tmp_path / "nope.json")


def test_dataset_load_errors_name_the_file(tmp_path):
    with pytest.raises(SearchError, match="not found"):
        LatencyDataset.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"task": "cls"}')
    with pytest.raises(SearchError, match="bad.json"):
        LatencyDataset.load(bad)


def test_unknown_backend_names_available_ones():
    with pytest.raises(SearchError) as e:
        measure(SPACE, SPACE.smallest(), "cls", "tpu")
    assert all(b in str(e.value) for b in BACKENDS)
    with pytest.raises(SearchError, match="torch-cpu"):
        collect(SPACE, "cls", 3, "tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(SearchError, match="needs a CUDA GPU"):
        measure(SPACE, SPACE.smallest(), "cls", "cuda")


def test_arch_errors():
    with pytest.raises(ArchError, match="no paths for task"):
        measure(SPACE, SPACE.smallest().model_copy(update={"paths": {}}), "cls", repeats=1)
    with pytest.raises(ArchError, match="unknown task"):
        measure(SPACE, SPACE.smallest(), "nope", repeats=1)
    with pytest.raises(SearchError, match="at least 2"):
        collect(SPACE, "cls", 1)


@pytest.mark.slow
def test_collect_on_onnx_runtime():
    ds = collect(SPACE, "cls", 2, "ort-cpu", repeats=3, warmup=1, progress=False)
    lat = [r.latency for r in ds.records]
    assert all(0 < x.q1_ms <= x.median_ms <= x.q3_ms and x.n == 3 for x in lat)


def test_cli_latency_then_predictor_fit(tmp_path):
    from typer.testing import CliRunner

    from ufo.cli import app
    from ufo.search.predictor import GPPredictor

    space_file = tmp_path / "space.json"
    space_file.write_text(SPACE.model_dump_json())
    data, pred = tmp_path / "lat.json", tmp_path / "p.safetensors"
    r = CliRunner().invoke(
        app,
        [
            "latency",
            str(space_file),
            "-t",
            "cls",
            "--out",
            str(data),
            "--samples",
            "10",
            "--repeats",
            "3",
            "--warmup",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["predictor", "fit", str(data), "--out", str(pred), "--folds", "2"])
    assert r.exit_code == 0, r.output
    assert "Kendall tau" in r.output
    gp = GPPredictor.load(pred, SPACE)
    assert gp.meta_["task"] == "cls" and gp.meta_["backend"] == "torch-cpu"
    r = CliRunner().invoke(
        app, ["latency", str(space_file), "-t", "cls", "--out", str(data), "--backend", "tpu"], env={"COLUMNS": "300"}
    )
    assert r.exit_code == 2 and "'tpu' is not one of 'torch-cpu', 'ort-cpu', 'cuda'" in r.output
