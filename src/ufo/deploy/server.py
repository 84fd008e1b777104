"""HTTP serving of task models: FastAPI on uvicorn, one process for many tasks.

`load_served(paths, backend)` opens run folders (one multi-task model at the run's arch, each
request running only its task's path), task_model files, or exported .onnx files, each once.
`create_app(served, settings)` builds the API:

    POST /v1/tasks/{task}:predict   image (multipart `file`, or raw bytes) -> top-k classes or embedding
    POST /v1/tasks/{task}:compare   multipart `image_a`, `image_b` -> cosine similarity, same/different
    GET  /v1/tasks                  served tasks with their metadata
    GET  /healthz, GET /metrics     liveness; Prometheus counters and latency histograms per task

Requests for one task that arrive together are micro-batched: a queue per task, drained into one
batch of up to `max_batch` images after at most `max_wait_ms`, and run on one inference thread.
Images are decoded and preprocessed exactly as the library reads data (PIL decode, resize to the
task's input size, the model's channels, mean/std), so served predictions equal `ufo eval`'s. Bad input
never reaches the model: unknown task 404, not an image 415, truncated image 422, decompression
bomb or oversized upload 413, a body that stalls 408, each as a JSON `ErrorResponse`.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import re
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field

from ufo.arch import Arch
from ufo.data.decode import decode  # the library's own decoder, so served inputs equal evaluated ones
from ufo.deploy.predict import read_output
from ufo.optional import require_extra
from ufo.taskmodel import DeployError, HeadInfo, Preprocessing, TaskModel, open_task_model

require_extra("serve")  # the packages below are the `serve` extra: one line naming it when one is missing

from fastapi import FastAPI, File, Query, Request, UploadFile  # noqa: E402
from fastapi import Path as PathParam  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

Backend = Literal["torch", "onnx"]


class Settings(BaseModel):
    max_batch: int = Field(32, ge=1)
    max_wait_ms: float = Field(5.0, ge=0)
    max_upload_mb: float = Field(8.0, gt=0)
    max_pixels: int = Field(Image.MAX_IMAGE_PIXELS or 89_478_485, gt=0)  # decompression-bomb limit
    # decoded pixels of all requests together (a request waits for room, then gets 503 after decode_wait_s)
    max_pixels_in_flight: int = Field(2 * (Image.MAX_IMAGE_PIXELS or 89_478_485), gt=0)
    decode_wait_s: float = Field(10.0, gt=0)
    # slow clients: each read of a request body waits at most this long (then 408 and the connection closes)
    body_timeout_s: float = Field(30.0, gt=0)
    keep_alive_s: float = Field(5.0, gt=0)  # an idle keep-alive connection is closed after this long (uvicorn)


# ----- what is served -----


@dataclass
class ServedTask:
    """One task as served: its facts (`preprocessing`: the task's own, at its input size) and `run`,
    normalised batch -> outputs (numpy)."""

    name: str
    head: HeadInfo
    preprocessing: Preprocessing
    arch: Arch
    run: Callable[[torch.Tensor], np.ndarray]
    backend: Backend
    source: str
    transform: Any = field(init=False)

    def __post_init__(self) -> None:
        self.transform = self.preprocessing.transform()


def _torch_runner(tm: TaskModel, task: str) -> Callable[[torch.Tensor], np.ndarray]:
    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        return tm(x, task).float().numpy()

    return run


def load_served(
    paths: Sequence[str | Path],
    backend: Backend = "torch",
    threads: int | None = None,
    workdir: str | Path | None = None,
) -> dict[str, ServedTask]:
    """Open every model once. A run folder (or trained model / task_model file) gives all its tasks;
    an .onnx file gives its one task. With backend onnx, torch models are exported to `workdir`
    (default: a temporary folder kept for the process) and run on ONNX Runtime."""
    out: dict[str, ServedTask] = {}

    def add(st: ServedTask) -> None:
        if st.name in out:
            raise DeployError(f"task {st.name!r} is served by both {out[st.name].source} and {st.source}")
        out[st.name] = st

    for p in paths:
        p = Path(p)
        if p.suffix == ".onnx":
            from ufo.deploy.onnx_export import OnnxTaskModel  # onnx/ORT only when used: less memory per process

            om = OnnxTaskModel(p, threads)
            add(ServedTask(om.task, om.head, om.preprocessing, om.arch, om, "onnx", str(p)))
            continue
        tm = open_task_model(p)
        for t in tm.tasks:
            info, pre = tm.info, tm.info.preprocessing.for_task(t)
            if backend == "torch":
                add(ServedTask(t, info.heads[t], pre, info.arch, _torch_runner(tm, t), "torch", str(p)))
            else:
                from ufo.deploy.onnx_export import OnnxTaskModel, export_onnx

                wd = Path(workdir or tempfile.mkdtemp(prefix="ufo-serve-"))
                om = OnnxTaskModel(export_onnx(tm, t, wd / f"{t}.onnx"), threads)
                add(ServedTask(t, info.heads[t], pre, info.arch, om, "onnx", str(p)))
    if not out:
        raise DeployError("no model to serve: give run folders, task_model files or .onnx files")
    return out


# ----- errors -----


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable error code, e.g. unknown_task, not_an_image")
    detail: str = Field(description="what was wrong, in words")


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


_HTTP_CODES = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed", 413: "upload_too_large"}


class PixelBudget:
    """Bounds the pixels being decoded at once, over all requests: a decode holds its image's pixel
    count from before decoding until its array is resized, waiting (up to `wait_s`, then 503) while
    others hold the rest. An image alone larger than the budget is refused with 413. After a large
    image the C heap is trimmed, so that the decoded buffers go back to the system."""

    TRIM_ABOVE = 16_000_000  # pixels

    def __init__(self, limit: int, wait_s: float) -> None:
        self.limit, self.wait_s, self.used = limit, wait_s, 0
        self.cond = threading.Condition()
        self._trim = _malloc_trim()

    @contextmanager
    def hold(self, pixels: int):
        if pixels > self.limit:
            raise ApiError(
                413,
                "image_too_large",
                f"image of {pixels:,} pixels exceeds the server's decode budget of {self.limit:,} pixels",
            )
        with self.cond:
            if not self.cond.wait_for(lambda: self.used + pixels <= self.limit, timeout=self.wait_s):
                raise ApiError(503, "busy", f"the server is decoding {self.used:,} pixels; retry later")
            self.used += pixels
        try:
            yield
        finally:
            with self.cond:
                self.used -= pixels
                self.cond.notify_all()
            if pixels > self.TRIM_ABOVE and self._trim is not None:
                self._trim(0)


def _malloc_trim():
    """glibc's malloc_trim, or None where there is none."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def decode_image(data: bytes, pre: Preprocessing, max_pixels: int, budget: PixelBudget | None = None) -> torch.Tensor:
    """Upload bytes -> uint8 (C, H, W) at `pre`'s input size, as the library's readers decode files;
    ApiError on bad input. With `budget`, the decode waits for room in it."""
    if not data:
        raise ApiError(400, "empty_image", "the request holds no image bytes")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, "image_too_large", f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise ApiError(415, "not_an_image", "the upload is not an image format PIL can read") from None
    except Exception as e:
        raise ApiError(422, "corrupt_image", f"the image header cannot be read: {e}") from None
    if w * h > max_pixels:
        raise ApiError(
            413,
            "image_too_large",
            f"image of {w}x{h} = {w * h:,} pixels exceeds the limit of "
            f"{max_pixels:,} pixels (decompression-bomb guard)",
        )
    try:
        with budget.hold(w * h) if budget is not None else nullcontext():
            arr = decode(data, pre.input_size(), None)
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ApiError(413, "image_too_large", f"decompression bomb refused: {e}") from None
    except Exception as e:  # truncated or corrupt pixel data
        raise ApiError(422, "corrupt_image", f"the image cannot be decoded (truncated or corrupt?): {e}") from None
    return torch.from_numpy(np.array(arr))  # a writable copy: decoded arrays may be read-only


# ----- micro-batching -----


@dataclass
class _Item:
    x: torch.Tensor
    fut: asyncio.Future


class Batcher:
    """Collects one task's requests into batches: after the first arrives, wait up to `max_wait`
    seconds (or until `max_batch`), run them as one batch on `executor`, answer each future."""

    def __init__(
        self,
        task: ServedTask,
        executor: ThreadPoolExecutor,
        max_batch: int,
        max_wait: float,
        observe: Callable[[int], None],
    ) -> None:
        self.task, self.executor, self.max_batch, self.max_wait, self.observe = (
            task,
            executor,
            max_batch,
            max_wait,
            observe,
        )
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    def start(self) -> None:
        self.worker = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, x: torch.Tensor) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Item(x, fut))
        return await fut

    async def _collect(self) -> list[_Item]:
        items = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(items) < self.max_batch:
            if not self.queue.empty():
                items.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return items

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._collect()
            items = [it for it in items if not it.fut.done()]  # clients that went away
            if not items:
                continue
            try:
                out = await loop.run_in_executor(self.executor, self.task.run, torch.stack([it.x for it in items]))
                self.observe(len(items))
            except Exception as e:  # a failed batch fails its requests, never the worker
                for it in items:
                    if not it.fut.done():
                        it.fut.set_exception(e)
                continue
            for i, it in enumerate(items):
                if not it.fut.done():
                    it.fut.set_result(out[i])


# ----- raw bodies -----


class _RawImageBody:
    """ASGI middleware: a `:predict` body sent as `application/x-www-form-urlencoded` (curl's default
    for `--data-binary @img.png` and `-d`) is the image's raw bytes, not a form. FastAPI would parse
    it as a form, consume the stream and fail with 500; the content type is read as
    `application/octet-stream` instead, so the bytes reach the decoder (an image, or a 415)."""

    FORM = b"application/x-www-form-urlencoded"

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path", "").endswith(":predict"):
            headers = scope.get("headers") or []
            if any(k == b"content-type" and v.split(b";")[0].strip().lower() == self.FORM for k, v in headers):
                headers = [(k, b"application/octet-stream" if k == b"content-type" else v) for k, v in headers]
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


# ----- upload limit -----


class _BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with a JSON 413.

    Starlette's own limiter answers a too-large Content-Length in plain text, which would break
    the JSON error contract. The rest of a refused body is read and dropped (up to `drain_bytes`)
    so that clients still sending get the 413 rather than a reset connection."""

    def __init__(self, app, max_bytes: int, drain_bytes: int = 64 * 1024 * 1024) -> None:
        self.app, self.max_bytes, self.drain_bytes = app, max_bytes, drain_bytes

    def _too_large(self) -> JSONResponse:
        return _error(413, "upload_too_large", f"upload exceeds the limit of {self.max_bytes:,} bytes")

    async def _drain(self, receive) -> None:
        seen = 0
        while seen <= self.drain_bytes:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                return

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            if int(length) <= self.max_bytes + self.drain_bytes:
                await self._drain(receive)
            return await self._too_large()(scope, receive, send)
        total, more = 0, True

        async def limited():
            nonlocal total, more
            msg = await receive()
            if msg["type"] == "http.request":
                total += len(msg.get("body", b""))
                more = msg.get("more_body", False)
                if total > self.max_bytes:
                    raise StarletteHTTPException(413, f"upload exceeds the limit of {self.max_bytes:,} bytes")
            return msg

        await self.app(scope, limited, send)
        if total > self.max_bytes and more:
            await self._drain(receive)


# ----- slow clients -----


class _BodyTimedOut(Exception):
    """Raised into the app when a body read outlasts the body timeout."""


class _BodyTimeout:
    """ASGI middleware: each read of the request body waits at most `timeout_s`. A client sending
    slower gets a JSON 408 `request_timeout` with `connection: close`, so slow clients cannot hold a
    request (and its partial body) open forever. Whatever the app answers to the half-read body
    (FastAPI turns a failed multipart read into a 400) is dropped for the 408. Reads after the body
    (waiting for a disconnect) are not timed."""

    def __init__(self, app, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_done, timed_out, started = False, False, False

        async def timed_receive():
            nonlocal body_done, timed_out
            if body_done:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                timed_out = True
                raise _BodyTimedOut(f"no request body bytes for {self.timeout_s:g} s") from None
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                body_done = True
            return msg

        async def guarded_send(message) -> None:
            nonlocal started
            if timed_out:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not timed_out:
                raise
        if timed_out and not started:
            r = _error(
                408,
                "request_timeout",
                f"the request body did not arrive: no bytes for {self.timeout_s:g} s (body timeout)",
            )
            r.headers["connection"] = "close"
            await r(scope, receive, send)


# ----- metrics -----


class _Metrics:
    """ASGI middleware: count and time every task request by its final status (413s raised while
    reading the body included). A client that went away before its answer (an `http.disconnect`
    received, or a failed send) is counted as 499, nginx's "client closed request", not as the
    400 or 500 the app makes of the broken read; its exception is dropped, there is no one to answer."""

    PATH = re.compile(r"^/v1/tasks/([^/]+):(predict|compare)$")
    GONE = 499

    def __init__(self, app, served: set[str], requests: Counter, latency: Histogram) -> None:
        self.app, self.served, self.requests, self.latency = app, served, requests, latency

    async def __call__(self, scope, receive, send) -> None:
        m = self.PATH.match(scope.get("path", "")) if scope["type"] == "http" else None
        if m is None:
            return await self.app(scope, receive, send)
        task = m.group(1) if m.group(1) in self.served else "_unknown"  # bounded label values
        status, t0, gone, done = 500, time.perf_counter(), False, False

        async def watch_receive():
            nonlocal gone
            msg = await receive()
            gone = gone or (msg["type"] == "http.disconnect" and not done)
            return msg

        async def send_status(message) -> None:
            nonlocal status, gone, done
            if message["type"] == "http.response.start":
                status = message["status"]
            try:
                await send(message)
            except OSError:  # the connection broke under the answer
                gone = True
                raise
            done = done or (message["type"] == "http.response.body" and not message.get("more_body", False))

        try:
            await self.app(scope, watch_receive, send_status)
        except Exception:
            if not gone:
                raise
        finally:
            self.requests.labels(task, m.group(2), str(self.GONE if gone else status)).inc()
            self.latency.labels(task, m.group(2)).observe(time.perf_counter() - t0)


# ----- API models -----


class ClassScore(BaseModel):
    index: int
    label: str | None = Field(None, description="class name, when the model file knows it")
    probability: float


class PredictResponse(BaseModel):
    task: str
    output: Literal["logits", "embedding"]
    top_k: list[ClassScore] | None = Field(None, description="classification: the k most likely classes")
    embedding: list[float] | None = Field(None, description="identity tasks: the L2-normalised embedding")


class CompareResponse(BaseModel):
    task: str
    similarity: float = Field(description="cosine similarity of the two embeddings")
    threshold: float
    same: bool = Field(description="similarity > threshold")


class TaskInfo(BaseModel):
    name: str
    kind: str
    output: Literal["logits", "embedding"]
    num_classes: int
    class_names: list[str] | None
    embedding_dim: int | None
    threshold: float | None
    backend: Backend
    source: str
    arch: dict[str, Any]
    preprocessing: Preprocessing


class TasksResponse(BaseModel):
    tasks: list[TaskInfo]


class Health(BaseModel):
    status: Literal["ok"]
    tasks: list[str]


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "bad request (empty or malformed upload)",
        404: "unknown task",
        413: "upload or image too large",
        408: "the request body stalled for body_timeout_s (request_timeout; the connection is closed)",
        415: "not an image",
        422: "corrupt or truncated image, or invalid parameters",
        409: "the task cannot do this (no threshold, not an embedding task)",
        500: "the model gave non-finite outputs (non_finite_output)",
        503: "busy: no room to decode the image within decode_wait_s",
    }
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}


_RAW_IMAGE_BODY = {
    "requestBody": {
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        }
    }
}


# ----- the app -----


def create_app(served: dict[str, ServedTask], settings: Settings | None = None) -> FastAPI:
    s = settings or Settings()
    registry = CollectorRegistry()
    requests = Counter(
        "ufo_requests", "Requests per task, endpoint and status code", ["task", "endpoint", "status"], registry=registry
    )
    latency = Histogram(
        "ufo_request_latency_seconds",
        "Request latency per task and endpoint",
        ["task", "endpoint"],
        registry=registry,
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    )
    batch_sizes = Histogram(
        "ufo_batch_size",
        "Images per model call (micro-batching)",
        ["task"],
        registry=registry,
        buckets=(1, 2, 4, 8, 16, 32, 64, 128),
    )
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ufo-infer")  # one model call at a time
    budget = PixelBudget(s.max_pixels_in_flight, s.decode_wait_s)

    def observe_batch(task: str) -> Callable[[int], None]:
        return lambda n: batch_sizes.labels(task).observe(n)

    batchers = {
        t: Batcher(st, executor, s.max_batch, s.max_wait_ms / 1e3, observe_batch(t)) for t, st in served.items()
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for b in batchers.values():
            b.start()
        yield
        for b in batchers.values():
            if b.worker is not None:
                b.worker.cancel()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="UFO task models",
        version="1",
        lifespan=lifespan,
        description="Predictions of UFO task models; each request runs only its task's path.",
    )

    app.add_middleware(_RawImageBody)
    app.add_middleware(_BodyLimit, max_bytes=int(s.max_upload_mb * 1024 * 1024))
    app.add_middleware(_BodyTimeout, timeout_s=s.body_timeout_s)
    app.add_middleware(_Metrics, served=set(served), requests=requests, latency=latency)  # outermost

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.error, e.detail)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, _HTTP_CODES.get(e.status_code, "http_error"), str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, "invalid_request", f"{where}: {first.get('msg')}")

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception) -> JSONResponse:
        return _error(500, "internal_error", f"{type(e).__name__}: {e}")

    def task_of(task: str) -> ServedTask:
        st = served.get(task)
        if st is None:
            raise ApiError(404, "unknown_task", f"unknown task {task!r}; served tasks: {sorted(served)}")
        return st

    async def image_of(st: ServedTask, data: bytes) -> torch.Tensor:
        u8 = await asyncio.to_thread(decode_image, data, st.preprocessing, s.max_pixels, budget)
        return st.transform(u8)

    async def infer(st: ServedTask, data: bytes) -> np.ndarray:
        out = await batchers[st.name].submit(await image_of(st, data))
        if not np.isfinite(out).all():  # never a 200 with null scores
            raise ApiError(500, "non_finite_output", f"task {st.name!r}: the model gave NaN or inf for this image")
        return out

    async def body_image(request: Request, file: UploadFile | None) -> bytes:
        if file is not None:
            return await file.read()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/"):
            raise ApiError(400, "missing_file", "multipart upload without a `file` field")
        return await request.body()

    @app.post(
        "/v1/tasks/{task}:predict",
        response_model=PredictResponse,
        responses=_responses(400, 404, 408, 413, 415, 422, 500, 503),
        openapi_extra=_RAW_IMAGE_BODY,
        summary="Predict one image",
    )
    async def predict(
        request: Request,
        task: str = PathParam(description="task name"),
        k: int = Query(5, ge=1, le=1000, description="classification: how many classes to return"),
        file: UploadFile | None = File(None, description="the image (or send raw image bytes)"),
    ) -> PredictResponse:
        """Top-k classes (classification) or the L2-normalised embedding (identity tasks) of one image,
        sent as multipart field `file` or as the raw request body."""
        st = task_of(task)
        pred = read_output(task, await infer(st, await body_image(request, file)), st.head, k)
        if pred.embedding is not None:  # read_output sets it for an embedding head, top_k and indices otherwise
            return PredictResponse(task=task, output="embedding", embedding=pred.embedding.tolist())
        scores = zip(pred.indices or [], pred.top_k or [])
        return PredictResponse(
            task=task,
            output="logits",
            top_k=[ClassScore(index=i, label=label, probability=p) for i, (label, p) in scores],
        )

    @app.post(
        "/v1/tasks/{task}:compare",
        response_model=CompareResponse,
        responses=_responses(400, 404, 408, 409, 413, 415, 422, 500, 503),
        summary="Same or different?",
    )
    async def compare(
        task: str = PathParam(description="task name"),
        image_a: UploadFile = File(description="first image"),
        image_b: UploadFile = File(description="second image"),
    ) -> CompareResponse:
        """Cosine similarity of two images' embeddings, and whether it passes the task's calibrated threshold."""
        st = task_of(task)
        if st.head.output != "embedding":
            raise ApiError(
                409, "not_an_embedding_task", f"task {task!r} outputs logits; compare needs an embedding task"
            )
        if st.head.threshold is None:
            raise ApiError(
                409,
                "no_threshold",
                f"task {task!r} has no calibrated threshold (thresholds are fitted "
                "for verification tasks when their data is available)",
            )
        a, b = await asyncio.gather(infer(st, await image_a.read()), infer(st, await image_b.read()))
        sim = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
        return CompareResponse(task=task, similarity=sim, threshold=st.head.threshold, same=sim > st.head.threshold)

    @app.get("/v1/tasks", response_model=TasksResponse, summary="Served tasks")
    async def tasks() -> TasksResponse:
        """Every served task with its kind, output, classes, threshold, arch and preprocessing."""
        return TasksResponse(
            tasks=[
                TaskInfo(
                    name=t,
                    kind=st.head.kind,
                    output=st.head.output,
                    num_classes=st.head.num_classes,
                    class_names=st.head.class_names,
                    embedding_dim=st.head.embedding_dim,
                    threshold=st.head.threshold,
                    backend=st.backend,
                    source=st.source,
                    arch=st.arch.model_dump(),
                    preprocessing=st.preprocessing,
                )
                for t, st in served.items()
            ]
        )

    @app.get("/healthz", response_model=Health, summary="Liveness")
    async def healthz() -> Health:
        return Health(status="ok", tasks=list(served))

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(
    paths: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    backend: Backend = "torch",
    settings: Settings | None = None,
    threads: int | None = None,
    log_level: str = "warning",
    announce: Callable[[str], Any] = print,
) -> None:
    """Load the models once and run the API on uvicorn until interrupted."""
    import uvicorn

    warnings.simplefilter("error", Image.DecompressionBombWarning)  # process-wide, set once before serving
    if threads is not None:
        torch.set_num_threads(threads)
    settings = settings or Settings()
    served = load_served(paths, backend, threads)
    app = create_app(served, settings)
    for t, st in served.items():
        announce(f"task {t}: {st.head.kind} -> {st.head.output} ({st.backend}, {st.source})")
    announce(f"serving {len(served)} task(s) on http://{host}:{port} (docs at /docs)")
    # uvicorn has no timeout for a request's headers: behind the open internet, put a proxy in front
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        # uvicorn annotates int, but hands the seconds to loop.call_later: a fraction works and is kept
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
    )
