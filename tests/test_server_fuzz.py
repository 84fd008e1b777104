"""Property-based fuzzing of the HTTP API (issue 21): hostile requests to every route (methods, task
names with `../`, `%00` and unicode, random query parameters, random bytes, truncated and garbled
image headers, valid tiny images of every mode, multipart with wrong field names, random content
types). Whatever comes in, the server never answers 500 (only `non_finite_output` may, which a sane
model cannot give), every 4xx/5xx is a JSON `{"error", "detail"}`, a well-formed image is predicted,
and the next valid request succeeds. Derandomized: CI runs the same examples every time."""

from __future__ import annotations

import io
import time
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from test_hardening import CFG
from ufo.config import parse_config
from ufo.deploy.server import Settings, create_app, load_served
from ufo.model import build_model
from ufo.taskmodel import extract_task_model, save_task_model

MAX_EXAMPLES = 300
# digits (logits) and faces (an embedding with a threshold), so that :compare runs to the end too
FUZZ_CFG = {
    **CFG,
    "tasks": {
        **CFG["tasks"],
        "faces": {"kind": "verification", "data": {"recipe": "digits"}, "options": {"embedding_dim": 8}},
    },
}

# format -> the modes PIL writes in it
FORMATS = {
    "PNG": ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"],
    "JPEG": ["L", "RGB", "CMYK"],
    "BMP": ["1", "L", "P", "RGB"],
    "GIF": ["L", "P"],
    "TIFF": ["1", "L", "RGB", "RGBA", "CMYK", "I", "F", "I;16"],
    "WEBP": ["RGB", "RGBA"],
    "PPM": ["1", "L", "RGB"],
    "ICO": ["RGBA"],
}
SIGNATURES = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0",
    b"GIF89a",
    b"BM",
    b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    b"II*\x00",
    b"MM\x00*",
    b"P5\n",
    b"P6\n",
    b"\x00\x00\x01\x00",
]
TASKS = [
    "digits",
    "nope",
    "../digits",
    "../../etc/passwd",
    "..%2F..%2Fdigits",
    "digits%00",
    "%00",
    "%ff%fe",
    "dïgits",
    "日本語",
    "a/b",
    "",
    " ",
    "digits:predict",
    "_unknown",
    "x" * 300,
]
ASCII = st.characters(min_codepoint=32, max_codepoint=126)
CTYPES = [
    "image/png",
    "image/jpeg",
    "application/octet-stream",
    "application/x-www-form-urlencoded",
    "multipart/form-data",
    "multipart/form-data; boundary=zzz",
    "text/plain; charset=utf-8",
    "application/json",
    "",
    "image/*",
]


@st.composite
def images(draw) -> bytes:
    """A valid tiny image: random format, mode, size and pixels."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    w, h = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    if fmt == "ICO":
        w, h = max(w, 16), max(h, 16)
    rgb = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, fmt)
    return buf.getvalue()


@st.composite
def broken_images(draw) -> bytes:
    """Truncated, garbled or header-only images, and PNM headers claiming any size."""
    how = draw(st.sampled_from(["truncated", "garbled", "signature", "pnm"]))
    if how == "pnm":
        w, h, mx = (draw(st.integers(0, 10**6)) for _ in range(3))
        return f"P{draw(st.sampled_from([5, 6]))}\n{w} {h}\n{mx}\n".encode() + draw(st.binary(max_size=64))
    if how == "signature":
        return draw(st.sampled_from(SIGNATURES)) + draw(st.binary(max_size=64))
    data = bytearray(draw(images()))
    if how == "truncated":
        return bytes(data[: draw(st.integers(0, max(len(data) - 1, 0)))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def payloads():
    return st.one_of(images(), broken_images(), st.binary(max_size=256))


@st.composite
def multiparts(draw) -> tuple[bytes, str]:
    """A multipart body with 0-3 parts under any field names (right ones included), and its content type
    (now and then with the wrong boundary)."""
    boundary = "ufo-fuzz"
    body = b""
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(["file", "image_a", "image_b", "files", "", "FILE"]) | st.text(ASCII, max_size=8))
        name = name.replace('"', "").replace("\\", "")
        body += (
            (
                f'--{boundary}\r\ncontent-disposition: form-data; name="{name}"; filename="x"\r\n'
                f"content-type: application/octet-stream\r\n\r\n"
            ).encode()
            + draw(payloads())
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    b = draw(st.sampled_from([boundary, boundary, "other", ""]))
    return body, f"multipart/form-data; boundary={b}"


@st.composite
def requests(draw) -> dict:
    """One hostile request: method, path, query, headers, body; `well_formed` marks a valid image POSTed
    raw to a served task's :predict, which must be answered 200."""
    if draw(st.booleans()):  # half aimed at the served tasks' endpoints, so that most bodies reach the decoder
        method = "POST"
        path = f"/v1/tasks/{draw(st.sampled_from(['digits', 'faces']))}:{draw(st.sampled_from(['predict', 'compare']))}"
    else:
        method = draw(st.sampled_from(["POST", "GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
        task = draw(
            st.sampled_from(["digits", "faces"] + TASKS) | st.text(max_size=12).map(lambda t: quote(t, safe="%/:."))
        )
        path = draw(
            st.sampled_from(
                [
                    f"/v1/tasks/{task}:predict",
                    f"/v1/tasks/{task}:compare",
                    "/v1/tasks",
                    f"/v1/tasks/{task}",
                    f"/v1/tasks/{task}:explode",
                    "/healthz",
                    "/metrics",
                    "/openapi.json",
                    f"/{task}",
                ]
            )
        )
    params = draw(
        st.just({})
        | st.dictionaries(
            st.sampled_from(["k", "K", "file", "task", "x"]),
            st.integers(-(10**12), 10**12) | st.text(max_size=8),
            max_size=3,
        )
    )
    kind = draw(st.sampled_from(["none", "raw", "raw", "image", "multipart", "multipart"]))
    headers, body = {}, b""
    if kind in ("raw", "image"):
        body = draw(images()) if kind == "image" else draw(payloads())
        ctype = draw(st.sampled_from(CTYPES) | st.text(ASCII, max_size=30) | st.none())
        if ctype is not None:
            headers["content-type"] = ctype
    elif kind == "multipart":
        body, headers["content-type"] = draw(multiparts())
    well_formed = (
        kind == "image"
        and method == "POST"
        and path == "/v1/tasks/digits:predict"
        and not params
        and not headers.get("content-type", "").lower().startswith("multipart/")
    )
    return {
        "method": method,
        "url": path,
        "params": params,
        "headers": headers,
        "content": body,
        "well_formed": well_formed,
    }


def _valid_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def app(tmp_path):
    cfg = parse_config(FUZZ_CFG)
    f = tmp_path / "fuzz.safetensors"
    save_task_model(
        f, extract_task_model(build_model(cfg, {"digits": 10, "faces": 10}).eval(), None, ["digits", "faces"], cfg)
    )
    served = load_served([f])
    served["faces"].head.threshold = 0.5  # fitted on data in real files; none here
    return create_app(served, Settings(max_upload_mb=1, max_pixels=4_000_000))


def test_hostile_requests_never_get_a_500_and_the_next_request_succeeds(app):
    png, seen = _valid_png(), {"examples": 0, "statuses": {}}
    t0 = time.perf_counter()

    with TestClient(app, raise_server_exceptions=False) as client:

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(req=requests())
        def check(req: dict) -> None:
            well_formed = req.pop("well_formed")
            r = client.request(**req)
            seen["examples"] += 1
            code = (
                r.status_code
                if r.status_code < 400 or req["method"] == "HEAD"
                else f"{r.status_code} {r.json()['error']}"
            )
            seen["statuses"][code] = seen["statuses"].get(code, 0) + 1
            what = f"{req['method']} {req['url']} {req['params']} {req['headers']} {req['content'][:40]!r}"
            if r.status_code >= 400 and req["method"] != "HEAD":
                assert r.headers["content-type"].startswith("application/json"), (what, r.status_code, r.text)
                err = r.json()
                assert set(err) == {"error", "detail"} and isinstance(err["detail"], str), (what, err)
                assert r.status_code != 500 or err["error"] == "non_finite_output", (what, err)
            assert r.status_code != 500, (what, r.text)
            if well_formed:
                assert r.status_code == 200 and r.json()["top_k"], (what, r.status_code, r.text)
            ok = client.post("/v1/tasks/digits:predict", content=png)
            assert ok.status_code == 200 and ok.json()["top_k"], (what, ok.text)

        check()
        assert client.get("/healthz").status_code == 200
    wall = time.perf_counter() - t0
    print(f"\nfuzz: {seen['examples']} requests in {wall:.1f} s, answers {seen['statuses']}")
    assert seen["examples"] >= MAX_EXAMPLES
