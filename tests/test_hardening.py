"""Hostile input to the model files, the config and the server: one-line errors, never a 200 with
null scores, and nothing written outside where it belongs (issue 21)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import safetensors
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file

from ufo.checkpoint import MANIFEST_KEY, CheckpointError, load_checkpoint
from ufo.config import parse_config
from ufo.deploy.onnx_export import export_task
from ufo.deploy.server import create_app, load_served
from ufo.errors import ConfigError
from ufo.model import build_model
from ufo.taskmodel import DeployError, extract_task_model, load_task_model, save_task_model

CFG = {
    "seed": 0,
    "model": {
        "img_size": 16,
        "patch_size": 8,
        "head_dim": 8,
        "depth": [1],
        "embed_dim": [16],
        "num_heads": [2],
        "mlp_ratio": [2.0],
    },
    "tasks": {"digits": {"kind": "classification", "data": {"recipe": "digits"}}},
}


@pytest.fixture
def model_file(tmp_path):
    cfg = parse_config(CFG)
    model = build_model(cfg, {"digits": 10})
    f = tmp_path / "digits.safetensors"
    save_task_model(f, extract_task_model(model.eval(), None, ["digits"], cfg))
    return f


def _rewrite(f, edit_manifest=None, edit_tensors=None):
    """Write `f` again with its manifest and/or tensors changed, bypassing the library's writer."""
    with safetensors.safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
        tensors = {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118  (safe_open is not iterable)
    manifest = json.loads(meta[MANIFEST_KEY])
    if edit_manifest:
        edit_manifest(manifest)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(f), metadata={MANIFEST_KEY: json.dumps(manifest)})


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../../x", "/tmp/evil", "a/b", "", ".hidden", "x" * 65])
def test_task_names_that_could_become_paths_are_refused(name, model_file):
    with pytest.raises(ConfigError, match="task name .* is not allowed"):
        parse_config({**CFG, "tasks": {name: CFG["tasks"]["digits"]}})

    def rename(m):
        m["tasks"], m["heads"] = [name], {name: m["heads"]["digits"]}
        m["space"]["tasks"] = [name]
        m["arch"]["paths"] = {name: m["arch"]["paths"]["digits"]}

    _rewrite(model_file, rename)
    with pytest.raises(CheckpointError) as e:
        load_task_model(model_file)
    assert "is not allowed" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["heads"]["digits"].update(class_names=["0", "1"]), "2 class_names for num_classes 10"),
        (lambda m: m["preprocessing"].update(std=[0.0, 0.5, 0.5]), "must be positive"),
        (lambda m: m["preprocessing"].update(img_size=4096), "outside 1..2048"),
        (
            lambda m: m["preprocessing"].update(img_size=24),
            "input size of task 'digits' is 24x24 but the model was built for 16x16",
        ),
        (lambda m: m["heads"]["digits"].update(num_classes=0), "num_classes of a logits head must be at least 1"),
    ],
)
def test_inconsistent_manifests_fail_at_load_in_one_line(model_file, edit, match):
    _rewrite(model_file, edit)
    with pytest.raises(CheckpointError, match=match) as e:
        load_task_model(model_file)
    assert "\n" not in str(e.value)


def test_flipped_weight_bytes_fail_the_checksum(model_file):
    load_checkpoint(model_file)  # intact: loads

    def flip(t):
        k = next(k for k in sorted(t) if t[k].is_floating_point())
        t[k].view(-1).view(torch.int32)[0] ^= 1 << 20

    _rewrite(model_file, edit_tensors=flip)
    with pytest.raises(CheckpointError, match="do not match the manifest's checksum"):
        load_task_model(model_file)


def test_nan_weights_are_refused_at_load_and_by_the_export_parity_check(model_file, tmp_path):
    tm = load_task_model(model_file)
    with torch.no_grad():
        tm.heads["digits"].fc.weight.fill_(float("nan"))
    with pytest.raises(DeployError, match="non-finite outputs"):
        export_task(tm, "digits", tmp_path / "digits.onnx")
    bad = tmp_path / "nan.safetensors"
    save_task_model(bad, tm)
    with pytest.raises(CheckpointError, match=r"non-finite weights .*heads\.digits\.fc\.weight"):
        load_task_model(bad)


def test_server_answers_nan_outputs_with_a_named_5xx_and_keeps_serving(model_file):
    served = load_served([model_file])
    st = served["digits"]
    good_run = st.run
    with TestClient(create_app(served)) as client:
        assert client.post("/v1/tasks/digits:predict", content=_png()).status_code == 200
        st.run = lambda x: np.full((len(x), 10), np.nan, dtype=np.float32)
        r = client.post("/v1/tasks/digits:predict", content=_png())
        assert r.status_code == 500 and r.json()["error"] == "non_finite_output"
        st.run = good_run
        r = client.post("/v1/tasks/digits:predict", content=_png(1))
        assert r.status_code == 200 and all(np.isfinite(t["probability"]) for t in r.json()["top_k"])


def test_pixel_budget_bounds_concurrent_decodes_then_answers_busy():
    import threading
    import time

    from ufo.deploy.server import ApiError, PixelBudget

    budget = PixelBudget(limit=100, wait_s=0.2)
    with pytest.raises(ApiError) as e, budget.hold(101):
        pass
    assert e.value.status == 413
    peak, lock = [0], threading.Lock()

    def decode():
        with budget.hold(40):
            with lock:
                peak[0] = max(peak[0], budget.used)
            time.sleep(0.05)

    threads = [threading.Thread(target=decode) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.used == 0  # at most two 40-pixel decodes at once, all finished
    with budget.hold(80), pytest.raises(ApiError) as e, budget.hold(40):
        pass
    assert e.value.status == 503 and e.value.error == "busy"


def test_server_refuses_an_image_over_the_decode_budget_and_serves_the_next(model_file):
    from ufo.deploy.server import Settings

    big = io.BytesIO()
    Image.new("RGB", (300, 300)).save(big, "PNG")
    with TestClient(create_app(load_served([model_file]), Settings(max_pixels_in_flight=50_000))) as client:
        r = client.post("/v1/tasks/digits:predict", content=big.getvalue())
        assert r.status_code == 413 and "decode budget" in r.json()["detail"]
        assert client.post("/v1/tasks/digits:predict", content=_png()).status_code == 200


# ----- slow and vanishing clients, through the ASGI interface as uvicorn calls it -----


def _call(
    app,
    path: str,
    chunks: list[bytes],
    after: str,
    *,
    ctype: bytes = b"application/octet-stream",
    gap_s: float = 0.0,
    send_error: Exception | None = None,
) -> list[dict]:
    """Run one request through `app` as uvicorn would: the body in `chunks` (`gap_s` apart), then
    `after`: "disconnect" (the client goes away mid-body), "stall" (it stops sending) or "end" (the
    last chunk ends the body). Returns the messages the app sent; `send_error` makes every send fail."""
    import asyncio

    msgs = [
        {"type": "http.request", "body": c, "more_body": after != "end" or i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    sent: list[dict] = []

    async def receive():
        if msgs:
            await asyncio.sleep(gap_s)
            return msgs.pop(0)
        if after == "stall":
            await asyncio.sleep(30)
        return {"type": "http.disconnect"}

    async def send(message):
        if send_error is not None:
            raise send_error
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", ctype)],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    asyncio.run(app(scope, receive, send))
    return sent


def _counts(app) -> dict[tuple[str, str], float]:
    """ufo_requests_total by (task, status), read from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = TestClient(app).get("/metrics").text
    return {
        (s.labels["task"], s.labels["status"]): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "ufo_requests_total"
    }


def _multipart(png: bytes) -> tuple[bytes, bytes]:
    boundary = b"ufo-test-boundary"
    body = (
        b"--" + boundary + b'\r\ncontent-disposition: form-data; name="file"; filename="x.png"\r\n'
        b"content-type: image/png\r\n\r\n" + png + b"\r\n--" + boundary + b"--\r\n"
    )
    return body, b"multipart/form-data; boundary=" + boundary


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_a_client_gone_mid_body_is_counted_499_not_500(model_file, form):
    app = create_app(load_served([model_file]))
    body, ctype = (_png(), b"image/png") if form == "raw" else _multipart(_png())
    sent = _call(app, "/v1/tasks/digits:predict", [body[:40]], "disconnect", ctype=ctype)  # no exception escapes
    assert all(m.get("status", 0) < 500 for m in sent)
    # an answer that cannot be sent (the connection broke): also 499
    _call(app, "/v1/tasks/nope:predict", [body], "end", ctype=ctype, send_error=BrokenPipeError())
    counts = _counts(app)
    assert counts[("digits", "499")] == 1 and counts[("_unknown", "499")] == 1
    assert not [k for k in counts if k[1] in ("500", "400")], counts


@pytest.mark.parametrize("form", ["raw", "multipart"])
def test_a_stalled_body_gets_408_and_the_connection_closes(model_file, form):
    from ufo.deploy.server import Settings

    app = create_app(load_served([model_file]), Settings(body_timeout_s=0.2))
    body, ctype = (_png(), b"image/png") if form == "raw" else _multipart(_png())
    sent = _call(app, "/v1/tasks/digits:predict", [body[:40]], "stall", ctype=ctype)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408 and (b"connection", b"close") in start["headers"]
    payload = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
    assert payload["error"] == "request_timeout" and "0.2 s" in payload["detail"]
    assert len([m for m in sent if m["type"] == "http.response.start"]) == 1  # the app's own 400 was dropped
    # a slow client whose every chunk comes within the timeout is served (here: 415, the body is no image)
    sent = _call(app, "/v1/tasks/digits:predict", [b"not an image, "] * 4, "end", gap_s=0.05)
    assert next(m for m in sent if m["type"] == "http.response.start")["status"] == 415
    assert _counts(app)[("digits", "408")] == 1
