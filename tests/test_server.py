"""The HTTP server, run for real: `ufo serve` in a subprocess on a free loopback port, called over
HTTP. Predictions equal the library's, bad inputs get 4xx JSON without hurting the process, a
short bounded load test, Prometheus metrics and the OpenAPI spec."""

from __future__ import annotations

import io
import os
import statistics
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from test_deploy import make_run
from ufo.deploy.process import ServeProcess
from ufo.evaluation.predict import make_predict
from ufo.taskmodel import load_task_data, load_trained


def _png(img: torch.Tensor) -> bytes:
    """uint8 (C, H, W) -> PNG bytes (grayscale for one channel)."""
    arr = img.numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def Server(*args: str) -> ServeProcess:
    """The real `ufo serve ARGS` on a free loopback port, ready to answer."""
    server = ServeProcess(list(args), threads=1)
    server.wait_ready(120)
    return server


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory)


@pytest.fixture(scope="module")
def server(run):
    s = Server(str(run), "--max-upload-mb", "1", "--max-batch", "16", "--max-wait-ms", "5")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def library(run):
    """The library's own predictions: the trained model at its arch, and each task's test images."""
    model, cfg, _ = load_trained(run)
    data = load_task_data(cfg, cfg.task_names)
    return model, cfg, data


def _predict_lib(library, task: str, n: int) -> tuple[list[bytes], torch.Tensor]:
    model, cfg, data = library
    test = data[task].eval["test"].subset(range(n))
    return [_png(img) for img in test.images], make_predict(model, task, cfg)(test)


def test_predictions_equal_the_library(server, library):
    pngs, logits = _predict_lib(library, "digits", 8)
    probs = torch.softmax(logits.double(), -1)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i, png in enumerate(pngs):
            body = c.post(
                "/v1/tasks/digits:predict", params={"k": 3}, files={"file": ("x.png", png, "image/png")}
            ).json()
            top = torch.topk(probs[i], 3)
            assert [t["index"] for t in body["top_k"]] == top.indices.tolist()
            assert np.allclose([t["probability"] for t in body["top_k"]], top.values.numpy(), atol=1e-5)
            assert body["top_k"][0]["label"] == str(top.indices[0].item())
        pngs, emb = _predict_lib(library, "mnist_ret", 4)
        for i, png in enumerate(pngs):  # raw body this time
            body = c.post("/v1/tasks/mnist_ret:predict", content=png, headers={"content-type": "image/png"}).json()
            assert body["output"] == "embedding" and np.abs(np.array(body["embedding"]) - emb[i].numpy()).max() <= 1e-5
            # curl --data-binary @x.png sends the bytes as a form content type: still the image
            form = {"content-type": "application/x-www-form-urlencoded"}
            assert c.post("/v1/tasks/mnist_ret:predict", content=png, headers=form).json() == body
        pngs, emb = _predict_lib(library, "faces", 2)
        r = c.post("/v1/tasks/faces:compare", files={"image_a": pngs[0], "image_b": pngs[1]}).json()
        threshold = next(t for t in c.get("/v1/tasks").json()["tasks"] if t["name"] == "faces")["threshold"]
        assert abs(r["similarity"] - float(emb[0] @ emb[1])) <= 1e-5 and r["threshold"] == threshold
        assert r["same"] == (r["similarity"] > threshold)
        for task, code in (("mnist_ret", "no_threshold"), ("digits", "not_an_embedding_task")):
            r = c.post(f"/v1/tasks/{task}:compare", files={"image_a": pngs[0], "image_b": pngs[1]})
            assert r.status_code == 409 and r.json()["error"] == code


def _bomb() -> bytes:
    """A 10,000 x 10,000 PNG (more than PIL's MAX_IMAGE_PIXELS) of a few KB."""
    buf = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_get_4xx_json_and_the_next_request_is_served(server, library):
    png = _predict_lib(library, "digits", 1)[0][0]
    bad = [
        ("unknown task", "/v1/tasks/nope:predict", {"content": png}, 404, "unknown_task"),
        ("not an image", "/v1/tasks/digits:predict", {"content": b"hello, not an image"}, 415, "not_an_image"),
        ("truncated PNG", "/v1/tasks/digits:predict", {"content": png[: len(png) // 2]}, 422, "corrupt_image"),
        ("empty body", "/v1/tasks/digits:predict", {"content": b""}, 400, "empty_image"),
        ("decompression bomb", "/v1/tasks/digits:predict", {"files": {"file": _bomb()}}, 413, "image_too_large"),
        ("oversized upload", "/v1/tasks/digits:predict", {"content": os.urandom(1_500_000)}, 413, "upload_too_large"),
        (
            "oversized multipart",
            "/v1/tasks/digits:predict",
            {"files": {"file": os.urandom(1_500_000)}},
            413,
            "upload_too_large",
        ),
        ("bad k", "/v1/tasks/digits:predict?k=0", {"content": png}, 422, "invalid_request"),
        ("a form (curl -d foo=bar)", "/v1/tasks/digits:predict", {"data": {"foo": "bar"}}, 415, "not_an_image"),
    ]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for what, url, kw, status, error in bad:
            r = c.post(url, **kw)
            assert r.status_code == status, (what, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json") and r.json()["error"] == error, what
            ok = c.post("/v1/tasks/digits:predict", content=png)
            assert ok.status_code == 200 and ok.json()["top_k"], what
    assert server.proc.poll() is None


def test_load_every_request_succeeds(server, library):
    pngs = _predict_lib(library, "digits", 8)[0] + _predict_lib(library, "mnist_ret", 8)[0]
    tasks = ["digits"] * 8 + ["mnist_ret"] * 8
    lat: list[float] = []
    failures: list[str] = []
    stop = time.perf_counter() + 3.0

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while time.perf_counter() < stop and len(lat) < 5000:
                i = int(rng.integers(len(pngs)))
                t0 = time.perf_counter()
                r = c.post(f"/v1/tasks/{tasks[i]}:predict", content=pngs[i])
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    wall = time.perf_counter() - t0
    assert not failures, failures[:3]
    q = statistics.quantiles(lat, n=100)
    print(
        f"\nload: 8 clients, {len(lat)} requests in {wall:.1f} s = {len(lat) / wall:.0f} req/s; "
        f"p50 {q[49] * 1e3:.1f} ms, p99 {q[98] * 1e3:.1f} ms"
    )
    assert len(lat) >= 8
    text = httpx.get(server.url + "/metrics").text
    count = _metric(text, 'ufo_batch_size_count{task="digits"}')
    total = _metric(text, 'ufo_batch_size_sum{task="digits"}')
    assert total >= count > 0  # requests arriving together shared model calls when total > count


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name)))


def test_metrics_have_per_task_counters_and_latency(server, library):
    png = _predict_lib(library, "digits", 1)[0][0]
    httpx.post(server.url + "/v1/tasks/digits:predict", content=png)
    httpx.post(server.url + "/v1/tasks/nope:predict", content=png)
    text = httpx.get(server.url + "/metrics").text
    assert _metric(text, 'ufo_requests_total{endpoint="predict",status="200",task="digits"}') >= 1
    assert _metric(text, 'ufo_requests_total{endpoint="predict",status="404",task="_unknown"}') >= 1
    assert 'ufo_request_latency_seconds_bucket{endpoint="predict",le="0.005",task="digits"}' in text
    assert 'ufo_request_latency_seconds_count{endpoint="predict",task="digits"}' in text


def test_openapi_lists_the_endpoints_and_errors(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    paths = spec["paths"]
    assert {"/v1/tasks/{task}:predict", "/v1/tasks/{task}:compare", "/v1/tasks", "/healthz", "/metrics"} <= set(paths)
    predict = paths["/v1/tasks/{task}:predict"]["post"]
    assert {"200", "400", "404", "413", "415", "422"} <= set(predict["responses"])
    assert predict["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    assert {"multipart/form-data", "application/octet-stream"} <= set(predict["requestBody"]["content"])
    assert "409" in paths["/v1/tasks/{task}:compare"]["post"]["responses"]
    assert {"PredictResponse", "CompareResponse", "TasksResponse", "ErrorResponse"} <= set(
        spec["components"]["schemas"]
    )
    tasks = httpx.get(server.url + "/v1/tasks").json()["tasks"]
    assert [t["name"] for t in tasks] == ["digits", "mnist_ret", "faces"]
    assert tasks[0]["preprocessing"] == {"img_size": 16, "in_chans": 3, "mean": [0.5] * 3, "std": [0.5] * 3}


def test_onnx_and_task_model_files_served_together(run, library, tmp_path):
    """An exported .onnx file and a task_model file in one process, predictions equal the library's."""
    from ufo.deploy.onnx_export import export_onnx
    from ufo.taskmodel import extract_task_model, save_task_model

    model, cfg, data = library
    export_onnx(extract_task_model(model, None, "digits", cfg), "digits", tmp_path / "digits.onnx")
    save_task_model(tmp_path / "faces.safetensors", extract_task_model(model, None, "faces", cfg, data))
    s = Server(str(tmp_path / "digits.onnx"), str(tmp_path / "faces.safetensors"))
    try:
        pngs, logits = _predict_lib(library, "digits", 4)
        probs = torch.softmax(logits.double(), -1)
        for i, png in enumerate(pngs):
            body = httpx.post(s.url + "/v1/tasks/digits:predict", params={"k": 10}, content=png).json()
            got = np.zeros(10)
            for t in body["top_k"]:
                got[t["index"]] = t["probability"]
            assert np.abs(got - probs[i].numpy()).max() <= 1e-4
        pngs, emb = _predict_lib(library, "faces", 1)
        body = httpx.post(s.url + "/v1/tasks/faces:predict", content=pngs[0]).json()
        assert np.abs(np.array(body["embedding"]) - emb[0].numpy()).max() <= 1e-5
        backends = {t["name"]: t["backend"] for t in httpx.get(s.url + "/v1/tasks").json()["tasks"]}
        assert backends == {"digits": "onnx", "faces": "torch"}
    finally:
        s.stop()
