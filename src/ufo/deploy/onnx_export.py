"""ONNX export of one task's path, with a parity check, INT8 quantization and ORT evaluation.

`export_onnx` traces `TaskModel.for_task(task)` with torch's exporter (the torch.export-based one,
the default since torch 2.9) at opset 18 with a dynamic batch axis, and stores the deployment
facts in the model's `metadata_props` (task, arch, preprocessing, output kind, classes,
threshold), so an .onnx file can be served on its own. `check_parity` compares ONNX Runtime with
torch on real inputs and fails with the difference. `quantize` makes an INT8 model with
`onnxruntime.quantization`: dynamic (weights only) or static QDQ calibrated on training images.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from ufo.arch import Arch
from ufo.checkpoint import atomic_write
from ufo.config import Config
from ufo.evaluation.predict import make_array_predict, model_inputs
from ufo.evaluation.protocol import evaluate_predict
from ufo.flags import int8_flag
from ufo.optional import require, require_extra
from ufo.taskmodel import DeployError, HeadInfo, Preprocessing, TaskModel
from ufo.tasks import TaskData
from ufo.tasks.base import Predict

if TYPE_CHECKING:  # onnx and onnxruntime are the `export` extra: imported where used
    import onnxruntime as ort

OPSET = 18
PARITY_TOL = 1e-4
INPUT, OUTPUT = "input", "output"
Int8Mode = Literal["dynamic", "static"]


# ----- export -----


def onnx_metadata(tm: TaskModel, task: str) -> dict[str, str]:
    """The `metadata_props` of task `task`'s ONNX model (all values are strings; JSON where structured)."""
    import ufo

    h, p = tm.info.heads[task], tm.info.preprocessing.for_task(task)
    return {
        "ufo.format": "ufo-onnx-task",
        "ufo.version": ufo.__version__,
        "task": task,
        "task_kind": h.kind,
        "output_kind": h.output,
        "arch": tm.info.arch.model_dump_json(),
        "input_size": json.dumps([p.in_chans, *p.input_size()]),
        "mean": json.dumps(p.mean),
        "std": json.dumps(p.std),
        "preprocessing": p.model_dump_json(),
        "head": h.model_dump_json(),
        "config": json.dumps(tm.info.config) if tm.info.config is not None else "null",
    }


def export_onnx(tm: TaskModel, task: str, out: str | Path, opset: int = OPSET) -> Path:
    """Write `task`'s path of `tm` as an ONNX model with a dynamic batch axis; returns `out`."""
    if opset < 17:
        raise DeployError(f"--opset {opset}: UFO exports need opset 17 or newer (LayerNormalization)")
    require_extra("export")  # torch's exporter needs onnxscript, and says so less clearly
    onnx = require("onnx")
    path = tm.for_task(task).eval()
    p = tm.info.preprocessing
    x = torch.zeros(2, p.in_chans, *p.input_size(task))  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        prog = torch.onnx.export(
            path,
            (x,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_shapes={"x": {0: batch}},
            verbose=False,
        )
    except Exception as e:  # the exporter's own errors are long; keep the cause
        raise DeployError(f"ONNX export of task {task!r} failed: {type(e).__name__}: {e}") from e
    if prog is None:  # only the legacy (dynamo=False) exporter returns None
        raise DeployError(f"ONNX export of task {task!r} returned no program")
    model = prog.model_proto
    onnx.helper.set_model_props(model, onnx_metadata(tm, task))
    onnx.checker.check_model(model)
    atomic_write(out, lambda tmp: onnx.save(model, str(tmp)))
    return Path(out)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata_props` of an ONNX file, without loading its weights into a session."""
    if not Path(path).is_file():
        raise DeployError(f"ONNX file not found: {path}")
    onnx = require("onnx")
    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError for truncated or foreign bytes
        raise DeployError(
            f"{path} is not a readable ONNX file (truncated or corrupt?): "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return {p.key: p.value for p in m.metadata_props}


# ----- running -----


def make_session(
    path: str | Path, threads: int | None = None, spinning: bool = True, level: ort.GraphOptimizationLevel | None = None
) -> ort.InferenceSession:
    """A CPU ONNX Runtime session (`threads`: intra-op threads, None for ORT's default; `level`:
    graph optimisation, default all). Without `spinning`, idle pool threads sleep instead of
    spinning: needed when ORT shares the cores with torch or other processes, whose threads the
    spinning would starve."""
    ort = require("onnxruntime")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if level is None else level
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise DeployError(f"{path}: ONNX Runtime cannot load it: {e}") from e


class OnnxTaskModel:
    """An exported task model on ONNX Runtime, with the facts from its metadata."""

    def __init__(self, path: str | Path, threads: int | None = None, spinning: bool = True) -> None:
        self.path = Path(path)
        meta = read_metadata(self.path)
        if meta.get("ufo.format") != "ufo-onnx-task":
            raise DeployError(f"{path} has no UFO metadata (metadata_props ufo.format); export it with `ufo export`")
        self.meta = meta
        try:
            self.task = meta["task"]
            self.head = HeadInfo.model_validate_json(meta["head"])
            self.preprocessing = Preprocessing.model_validate_json(meta["preprocessing"])
            self.arch = Arch.model_validate_json(meta["arch"])
            cfg = json.loads(meta.get("config", "null"))
        except (KeyError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            what = f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())[:300]
            raise DeployError(f"{path}: its UFO metadata is incomplete or corrupt: {what}") from None
        self.config: dict[str, Any] | None = cfg
        self.session = make_session(self.path, threads, spinning)

    def __call__(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        """Outputs for normalised input (B, C, H, W)."""
        arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        return self.session.run(None, {INPUT: np.ascontiguousarray(arr, dtype=np.float32)})[0]

    def predict_fn(self, batch_size: int = 256, on_error: str = "raise") -> Predict:
        """images -> this model's outputs, batched through its own preprocessing (`ufo.evaluation`)."""
        return make_array_predict(self, self.preprocessing, batch_size, on_error)


def _cat(batches: list[torch.Tensor], pre: Preprocessing) -> torch.Tensor:
    return torch.cat(batches) if batches else torch.empty(0, pre.in_chans, *pre.input_size())


# ----- checks -----


def sample_inputs(
    pre: Preprocessing, data: TaskData | None, n: int = 64, seed: int = 0, on_error: str = "raise"
) -> torch.Tensor:
    """Normalised model input at `pre`'s size (the task's own preprocessing): the first `n`
    evaluation images of `data`, else seeded random images."""
    if data is None:
        g = torch.Generator().manual_seed(seed)
        imgs = torch.randint(0, 256, (n, pre.in_chans, *pre.input_size()), dtype=torch.uint8, generator=g)
        return pre.transform()(imgs)
    parts, left = [], n
    for ds in data.eval.values():
        if left <= 0:
            break
        k = min(left, len(ds))
        parts += list(model_inputs(ds.subset(range(k)), pre, on_error=on_error))
        left -= k
    return _cat(parts, pre)


@torch.inference_mode()
def max_abs_diff(tm: TaskModel, task: str, onnx_model: OnnxTaskModel, x: torch.Tensor, batch: int = 32) -> float:
    worst = 0.0
    for i in range(0, len(x), batch):
        ref, got = tm(x[i : i + batch], task).numpy(), onnx_model(x[i : i + batch])
        for who, out in (("torch", ref), ("ONNX Runtime", got)):
            if not np.isfinite(out).all():  # NaN - NaN is NaN, and max() would skip it: refuse outright
                raise DeployError(
                    f"{onnx_model.path}: {who} gives non-finite outputs (NaN or inf) for task {task!r}; "
                    "the model's weights or inputs are broken"
                )
        worst = max(worst, float(np.abs(got - ref).max()))
    return worst


def check_parity(
    tm: TaskModel, task: str, onnx_model: OnnxTaskModel, x: torch.Tensor, tol: float = PARITY_TOL
) -> float:
    """Max |ORT - torch| over `x`; raises DeployError when it exceeds `tol`."""
    diff = max_abs_diff(tm, task, onnx_model, x)
    if not diff <= tol:
        raise DeployError(
            f"{onnx_model.path}: ONNX Runtime differs from torch by {diff:.3g} (max abs) on "
            f"{len(x)} inputs of task {task!r}; the tolerance is {tol:g}"
        )
    return diff


# ----- INT8 -----


class ImageCalibrationReader:
    """Feeds normalised training images to static quantization's calibration, a batch at a time
    (ORT's `CalibrationDataReader` interface: ORT only calls `get_next`, so the class need not
    derive from it and onnxruntime is imported only when quantizing)."""

    def __init__(self, x: torch.Tensor, batch: int = 32) -> None:
        self.batches = [x[i : i + batch].numpy() for i in range(0, len(x), batch)]
        self.pos = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {INPUT: self.batches[self.pos - 1]}

    def rewind(self) -> None:
        self.pos = 0


def calibration_inputs(
    pre: Preprocessing, data: TaskData, n: int = 256, seed: int = 0, on_error: str = "raise"
) -> torch.Tensor:
    """A seeded sample of `n` training images, preprocessed for the model (`pre`: the task's own)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[:n]
    return _cat(list(model_inputs(data.train.subset(idx), pre, on_error=on_error)), pre)


def cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI int8 dot products (x86 Linux flags; False when unknown)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def quantize(
    fp32: str | Path,
    out: str | Path,
    mode: Int8Mode,
    calib: torch.Tensor | None = None,
    per_channel: bool = True,
    reduce_range: bool | None = None,
) -> Path:
    """INT8 model of an fp32 export. `dynamic`: int8 weights, activations quantized on the fly.
    `static`: QDQ with activation ranges calibrated on `calib` (normalised images), every op type
    ORT can quantize (not only MatMul: the float Add/Mul/Softmax between them is where a ViT's
    remaining time goes). The fp32 model's metadata is kept, with `int8` added.

    `reduce_range` (default: on when the CPU lacks VNNI) quantizes weights to 7 bits: without VNNI,
    u8 x s8 products are summed in saturating int16 and 8-bit weights overflow. On the demo this
    turned a 1.8-point top-1 drop into none."""
    fp32, out = Path(fp32), Path(out)
    onnx = require("onnx")
    q8 = require("onnxruntime.quantization")
    rr = (not cpu_has_vnni()) if reduce_range is None else reduce_range
    with tempfile.TemporaryDirectory(prefix="ufo-int8-") as tmp, _quiet_root_logger():
        pre = Path(tmp) / "pre.onnx"
        _preprocess(fp32, pre)
        q = Path(tmp) / "q.onnx"
        if mode == "dynamic":
            q8.quantize_dynamic(pre, q, per_channel=per_channel, reduce_range=rr, weight_type=q8.QuantType.QInt8)
        elif mode == "static":
            if calib is None or len(calib) == 0:
                raise DeployError("static INT8 needs calibration images: the task's training data was not found")
            q8.quantize_static(
                pre,
                q,
                ImageCalibrationReader(calib),
                quant_format=q8.QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=rr,
                activation_type=q8.QuantType.QUInt8,
                weight_type=q8.QuantType.QInt8,
            )
        else:
            raise DeployError(f"--int8 {mode!r}: expected dynamic or static")
        model = onnx.load(str(q))
        meta = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
        onnx.helper.set_model_props(model, {**meta, "int8": mode, "int8_reduce_range": str(rr).lower()})
        atomic_write(out, lambda t: onnx.save(model, str(t)))
    return out


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs advice per tensor on the root logger; keep errors only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _preprocess(src: Path, dst: Path) -> None:
    """ORT's recommended pre-quantization step (shape inference and graph optimisation)."""
    quant_pre_process = require("onnxruntime.quantization.shape_inference").quant_pre_process
    onnx = require("onnx")
    for skip_symbolic in (False, True):  # ORT's symbolic shape inference fails on F.normalize's Expand
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return
        except Exception:
            continue
    onnx.save(onnx.load(str(src)), str(dst))


# ----- INT8 latency and the whole export -----


def int8_latency(fp32: str | Path, int8: str | Path, x: torch.Tensor, repeats: int = 30) -> dict[str, float]:
    """Median ms of one call of the FP32 and the INT8 ONNX model on `x` (batch 1 is what a server
    sees), one thread each, timed in interleaved rounds so a load burst hits both alike."""
    import time

    models = {"fp32": OnnxTaskModel(fp32, threads=1), "int8": OnnxTaskModel(int8, threads=1)}
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up
        for _ in range(3):
            m(x)
    for _ in range(repeats):
        for k, m in models.items():
            t0 = time.perf_counter()
            m(x)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def export_task(
    tm: TaskModel,
    task: str,
    out: str | Path,
    int8: Int8Mode | None = None,
    cfg: Config | None = None,
    data: TaskData | None = None,
    opset: int = OPSET,
    tol: float = PARITY_TOL,
    calib_size: int = 256,
    threads: int | None = None,
) -> dict[str, Any]:
    """Export, check parity, optionally quantize, and evaluate. Returns a report dict.

    Without `--int8`, `out` is the fp32 model. With it, `out` is the INT8 model and the fp32 one is
    written beside it as `<stem>.fp32.onnx`. Metrics need `cfg` and `data` (the task's test split).
    """
    out = Path(out)
    fp32 = out if int8 is None else out.with_name(f"{out.stem}.fp32{out.suffix or '.onnx'}")
    export_onnx(tm, task, fp32, opset)
    pre, head = tm.info.preprocessing.for_task(task), tm.info.heads[task]
    on_error = cfg.tasks[task].data.on_error if cfg is not None and task in cfg.tasks else "raise"
    m32 = OnnxTaskModel(fp32, threads)
    x = sample_inputs(pre, data, on_error=on_error)
    report: dict[str, Any] = {
        "task": task,
        "fp32": str(fp32),
        "opset": opset,
        "output_kind": head.output,
        "parity_inputs": "test images" if data is not None else "seeded random images",
        "parity_n": len(x),
        "parity_tol": tol,
    }
    report["parity_max_abs_diff"] = check_parity(tm, task, m32, x, tol)
    if cfg is not None and data is not None:
        report["metrics_fp32"] = evaluate_predict(m32.predict_fn(on_error=on_error), task, head, cfg, data)
    if int8 is not None:
        calib = (
            calibration_inputs(pre, data, calib_size, cfg.seed if cfg else 0, on_error) if data is not None else None
        )
        quantize(fp32, out, int8, calib)
        m8 = OnnxTaskModel(out, threads)
        report["int8"] = {
            "mode": int8,
            "path": str(out),
            "max_abs_diff_vs_torch": max_abs_diff(tm, task, m8, x),
            "size_bytes": out.stat().st_size,
            "fp32_size_bytes": fp32.stat().st_size,
            "latency_ms": int8_latency(fp32, out, x[:1]),
        }
        flag = int8_flag(task, report["int8"]["latency_ms"]["fp32"], report["int8"]["latency_ms"]["int8"])
        report["warnings"] = [flag] if flag else []
        if cfg is not None and data is not None:
            report["metrics_int8"] = evaluate_predict(m8.predict_fn(on_error=on_error), task, head, cfg, data)
    if cfg is not None and data is not None:
        report["primary"] = head.primary
    return report


def export_from(
    source: str | Path,
    out: str | Path,
    tasks: Sequence[str] | None = None,
    arch: str | None = None,
    int8: Int8Mode | None = None,
    opset: int = OPSET,
    tol: float = PARITY_TOL,
    calib_size: int = 256,
    data_root: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """`ufo export`: a task_model file, or a run folder cut at `arch`, to ONNX (and INT8) for one task,
    with the task's data (when found) for the parity inputs, calibration and metrics."""
    from ufo.taskmodel import load_task_data, open_task_model, task_config

    tm = open_task_model(source, tasks, arch, data_root)
    task = single_task(tm, tasks)
    cfg = task_config(tm, data_root)
    data = (load_task_data(cfg, [task]) if cfg is not None and task in cfg.tasks else {}).get(task)
    return export_task(tm, task, out, int8, cfg, data, opset, tol, calib_size, threads)


def single_task(tm: TaskModel, tasks: Sequence[str] | None) -> str:
    """The one task to export: the given one, or the model's only task."""
    if tasks:
        if len(tasks) > 1:
            raise DeployError(f"ONNX export writes one task per file; got --task {list(tasks)}")
        tm.check_task(tasks[0])
        return tasks[0]
    if len(tm.tasks) > 1:
        raise DeployError(f"the model serves {tm.tasks}; choose one with --task")
    return tm.tasks[0]
