"""Corrupt files against every consumer (issue 21): each corruption of a task model, a trained
model, an .onnx file or a run folder gives a UFOError naming the file from the library and a
one-line error with exit code 2 from the CLI, never a traceback. Also: the run-folder lock, and
a full disk while writing."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import safetensors
import yaml
from safetensors.torch import save_file
from typer.testing import CliRunner

from ufo.checkpoint import MANIFEST_KEY, atomic_write_text, load_checkpoint, save_checkpoint, weights_digest
from ufo.cli import app
from ufo.config import parse_config
from ufo.errors import UFOError
from ufo.model import build_model, load_model, resolve_train_arch, save_model
from ufo.taskmodel import extract_task_model, load_task_model, save_task_model

BIN = Path(sys.executable).parent
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
    "tasks": {"digits": {"kind": "classification", "data": {"recipe": "digits", "max_train": 200}}},
    "train": {"steps": 2, "batch_size": 16, "log_every": 1, "ckpt_every": 2, "warmup_steps": 1, "threads": 1},
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[str, Path]:
    """One intact task model, .onnx file and run folder (model.safetensors + config.yaml), built once."""
    from ufo.deploy.onnx_export import export_onnx

    d = tmp_path_factory.mktemp("good")
    cfg = parse_config(CFG)
    model = build_model(cfg, {"digits": 10}).eval()
    tm = extract_task_model(model, None, ["digits"], cfg)
    save_task_model(d / "digits.safetensors", tm)
    export_onnx(tm, "digits", d / "digits.onnx")
    run = d / "run"
    save_model(run / "model.safetensors", model, cfg, resolve_train_arch(cfg, model.space))
    atomic_write_text(run / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return {"task_model": d / "digits.safetensors", "onnx": d / "digits.onnx", "run": run}


# ----- corruptions -----


def _read(f: Path) -> tuple[dict, dict]:
    with safetensors.safe_open(str(f), framework="pt") as h:
        return json.loads(h.metadata()[MANIFEST_KEY]), {k: h.get_tensor(k) for k in h.keys()}  # noqa: SIM118  (safe_open is not iterable)


def _write(f: Path, manifest: dict | str, tensors: dict, redigest: bool = False) -> None:
    """Write `f` bypassing the library's writer; `redigest` keeps the checksum right, so the checks
    behind it (missing, extra, misshapen tensors) are the ones that must catch the change."""
    if redigest and isinstance(manifest, dict):
        manifest["weights_sha256"] = weights_digest(tensors)
    save_file(tensors, str(f), metadata={MANIFEST_KEY: manifest if isinstance(manifest, str) else json.dumps(manifest)})


def _truncate(at: Callable[[bytes], int]) -> Callable[[Path], None]:
    def cut(f: Path) -> None:
        b = f.read_bytes()
        f.write_bytes(b[: at(b)])

    return cut


def _header_len(b: bytes) -> int:
    return struct.unpack("<Q", b[:8])[0]


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(f: Path) -> None:
        m, t = _read(f)
        edit(m)
        _write(f, m, t)

    return apply


def _edit_tensors(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(f: Path) -> None:
        m, t = _read(f)
        edit(t)
        _write(f, m, t, redigest=True)

    return apply


def _flip_weight_byte(f: Path) -> None:
    b = bytearray(f.read_bytes())
    b[8 + _header_len(b) + 2] ^= 0x10  # a low mantissa bit of the first tensor's first value
    f.write_bytes(bytes(b))


def _first_float(t: dict) -> str:
    return next(k for k in sorted(t) if t[k].is_floating_point() and t[k].ndim >= 1)


CHECKPOINT_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "empty": lambda f: f.write_bytes(b""),
    "random_bytes": lambda f: f.write_bytes(np.random.default_rng(0).bytes(4096)),
    "truncated_in_length": _truncate(lambda b: 5),
    "truncated_in_header": _truncate(lambda b: 8 + _header_len(b) // 2),
    "truncated_in_weights": _truncate(lambda b: (8 + _header_len(b) + len(b)) // 2),
    "truncated_last_byte": _truncate(lambda b: len(b) - 1),
    "manifest_garbled": lambda f: _write(f, '{"format": "ufo-checkpoint", "kind": ', _read(f)[1]),
    "manifest_not_object": lambda f: _write(f, "[1, 2]", _read(f)[1]),
    "wrong_kind": _edit_manifest(lambda m: m.update(kind="supernet" if m["kind"] != "supernet" else "vit")),
    "newer_format_version": _edit_manifest(lambda m: m.update(format_version=99)),
    "format_version_not_int": _edit_manifest(lambda m: m.update(format_version="one")),
    "flipped_weight_byte": _flip_weight_byte,
    "missing_tensor": _edit_tensors(lambda t: t.pop(_first_float(t))),
    "extra_tensor": _edit_tensors(lambda t: t.update({"intruder.weight": t[_first_float(t)].clone()})),
    "wrong_shape": _edit_tensors(lambda t: t.update({_first_float(t): t[_first_float(t)].reshape(-1)[:-1].clone()})),
}
ONNX_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "empty": lambda f: f.write_bytes(b""),
    "random_bytes": lambda f: f.write_bytes(np.random.default_rng(1).bytes(4096)),
    "truncated_half": _truncate(lambda b: len(b) // 2),
    "truncated_last_byte": _truncate(lambda b: len(b) - 1),
}


def _corrupt(src: Path, dst: Path, how: Callable[[Path], None]) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    how(dst / "model.safetensors" if dst.is_dir() else dst)
    return dst


def _one_line_naming(e: BaseException, f: Path) -> None:
    msg = str(e)
    assert isinstance(e, UFOError), f"{type(e).__name__}: {msg}"
    assert "\n" not in msg and str(f) in msg, msg


def _cli(args: list[str], monkeypatch: pytest.MonkeyPatch | None = None):
    """Invoke the CLI in-process; serve must fail before uvicorn ever binds."""
    if monkeypatch is not None:
        import uvicorn

        def bound(*a, **k):
            raise AssertionError("ufo serve got as far as binding its port")

        monkeypatch.setattr(uvicorn, "run", bound)
    return CliRunner().invoke(app, args, env={"COLUMNS": "300"})


def _assert_one_line_exit_2(res, name: str = "") -> None:
    out = res.output  # stdout and stderr together
    assert res.exit_code == 2, f"exit {res.exit_code}: {out}\n{res.exception!r}"
    assert "Traceback" not in out and isinstance(res.exception, SystemExit), out
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and name in lines[0], out


def _ufo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ufo"), *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "300"}
    )


def _assert_subprocess_exit_2(res: subprocess.CompletedProcess, *needles: str, lines: int = 1) -> None:
    """Exit 2 and an `error:` message of `lines` lines (one, unless several config fields are bad)."""
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(err) == lines and err[0].startswith("error:"), res.stderr
    assert all(n in res.stderr for n in needles), res.stderr


# ----- task model and trained model files -----


@pytest.mark.parametrize("corruption", list(CHECKPOINT_CORRUPTIONS))
def test_library_loaders_refuse_corrupt_checkpoints_naming_the_file(corruption, good, tmp_path):
    how = CHECKPOINT_CORRUPTIONS[corruption]
    tm = _corrupt(good["task_model"], tmp_path / "digits.safetensors", how)
    with pytest.raises(UFOError) as e:
        load_task_model(tm)
    _one_line_naming(e.value, tm)
    run_model = _corrupt(good["run"] / "model.safetensors", tmp_path / "model.safetensors", how)
    with pytest.raises(UFOError) as e:
        load_model(run_model)
    _one_line_naming(e.value, run_model)


@pytest.mark.parametrize("corruption", list(CHECKPOINT_CORRUPTIONS))
def test_cli_commands_refuse_corrupt_checkpoints_in_one_line(corruption, good, tmp_path, monkeypatch):
    how = CHECKPOINT_CORRUPTIONS[corruption]
    tm = _corrupt(good["task_model"], tmp_path / "digits.safetensors", how)
    run = _corrupt(good["run"], tmp_path / "run", how)
    _assert_one_line_exit_2(_cli(["export", str(tm), "--out", str(tmp_path / "x.onnx")]), str(tm))
    _assert_one_line_exit_2(_cli(["serve", str(tm), "--port", "1"], monkeypatch), str(tm))
    # each names the run folder or its model.safetensors
    _assert_one_line_exit_2(
        _cli(["extract", str(run), "-t", "digits", "--out", str(tmp_path / "e.safetensors")]), str(run)
    )
    _assert_one_line_exit_2(_cli(["eval", str(run)]), str(run))
    _assert_one_line_exit_2(_cli(["serve", str(run), "--port", "1"], monkeypatch), str(run))
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "e.safetensors").exists()


@pytest.mark.parametrize("corruption", list(ONNX_CORRUPTIONS))
def test_corrupt_onnx_files_are_refused(corruption, good, tmp_path, monkeypatch):
    from ufo.deploy.onnx_export import OnnxTaskModel

    f = _corrupt(good["onnx"], tmp_path / "digits.onnx", ONNX_CORRUPTIONS[corruption])
    with pytest.raises(UFOError) as e:
        OnnxTaskModel(f)
    _one_line_naming(e.value, f)
    _assert_one_line_exit_2(_cli(["serve", str(f), "--port", "1"], monkeypatch), str(f))


# ----- run folders -----


def _garble_config(run: Path) -> None:
    (run / "config.yaml").write_text("name: [unclosed\n  tasks: {")


RUN_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "missing_model": lambda run: (run / "model.safetensors").unlink(),
    "model_is_a_folder": lambda run: ((run / "model.safetensors").unlink(), (run / "model.safetensors").mkdir()),
    "missing_config": lambda run: (run / "config.yaml").unlink(),
    "config_garbled": _garble_config,
}


@pytest.mark.parametrize("corruption", list(RUN_CORRUPTIONS))
def test_broken_run_folders(corruption, good, tmp_path, monkeypatch):
    """The model file is what the consumers need (its manifest carries the config): without it
    they fail in one line; config.yaml is the report's, which must say so in one line too."""
    run = tmp_path / "run"
    shutil.copytree(good["run"], run)
    RUN_CORRUPTIONS[corruption](run)
    results = {
        "extract": _cli(["extract", str(run), "-t", "digits", "--out", str(tmp_path / "e.safetensors")]),
        "export": _cli(["export", str(run), "-t", "digits", "--out", str(tmp_path / "x.onnx")]),
        "report": _cli(["report", str(run)]),
    }
    if corruption.startswith("missing_model") or corruption == "model_is_a_folder":
        results["eval"] = _cli(["eval", str(run)])
        results["serve"] = _cli(["serve", str(run), "--port", "1"], monkeypatch)
        for name in ("extract", "export", "eval", "serve"):
            _assert_one_line_exit_2(results[name], "model.safetensors")
    else:
        res = results["extract"]
        assert res.exit_code == 0, res.output  # the manifest carries the config: config.yaml is not needed
    res = results["report"]  # reads config.yaml and the stage records only
    if corruption.startswith("config") or corruption == "missing_config":
        _assert_one_line_exit_2(res, "config.yaml")
    else:
        assert res.exit_code == 0, res.output


# ----- through the real command line -----


def _task_model_with(good: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    shutil.copy(good, dst)
    _edit_manifest(edit)(dst)
    return dst


def _rename_task(name: str) -> Callable[[dict], None]:
    def rename(m: dict) -> None:
        m["tasks"], m["heads"] = [name], {name: m["heads"]["digits"]}
        m["space"]["tasks"] = [name]
        m["arch"]["paths"] = {name: m["arch"]["paths"]["digits"]}

    return rename


def test_real_cli_one_line_errors(good, tmp_path):
    """Issue 21's cases through the installed `ufo`: exit 2, one `error:` line, no traceback."""
    evil = _task_model_with(good["task_model"], tmp_path / "evil.safetensors", _rename_task("../../x"))
    std0 = _task_model_with(
        good["task_model"], tmp_path / "std0.safetensors", lambda m: m["preprocessing"].update(std=[0.0, 0.5, 0.5])
    )
    _assert_subprocess_exit_2(_ufo("export", str(evil), "--out", str(tmp_path / "e.onnx")), str(evil), "../../x")
    _assert_subprocess_exit_2(_ufo("export", str(std0), "--out", str(tmp_path / "s.onnx")), str(std0), "positive")
    _assert_subprocess_exit_2(_ufo("serve", str(evil), "--port", "1", timeout=60), str(evil), "../../x")
    truncated = _corrupt(good["task_model"], tmp_path / "t.safetensors", CHECKPOINT_CORRUPTIONS["truncated_in_weights"])
    _assert_subprocess_exit_2(_ufo("serve", str(truncated), "--port", "1", timeout=60), str(truncated))
    for where, override in (
        ("model.img_size", "model.img_size=20"),
        ("tasks.digits.img_size", "tasks.digits.img_size=12"),
    ):
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump(CFG))
        res = _ufo("train", str(cfg), "--out", str(tmp_path / "r"), "--set", override)
        _assert_subprocess_exit_2(res, where, "multiple of model.patch_size")


# ----- the run-folder lock -----

HOLD = """
import sys, time
from ufo.runlock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_writer_on_a_locked_run_folder_fails_at_once(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(CFG))
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = _ufo("train", str(cfg), "--out", str(run))
        _assert_subprocess_exit_2(res, str(run), f"pid {holder.pid}", "in use by another ufo process")
        assert not (run / "config.yaml").exists()  # refused before writing anything
        # in-process too: every writer goes through the same lock
        _assert_one_line_exit_2(_cli(["eval", str(run)]), f"pid {holder.pid}")
    finally:
        holder.kill()  # the kernel drops the flock with its holder: a crashed run can resume
        holder.wait()
    res = _ufo("train", str(cfg), "--out", str(run))
    assert res.returncode == 0, res.stderr
    assert (run / "model.safetensors").is_file()


def test_the_lock_is_reentrant_in_one_process_and_only_rank_0_takes_it(tmp_path):
    from ufo.runlock import holder, run_lock

    with run_lock(tmp_path), run_lock(tmp_path / "."):  # the same folder, spelt differently
        assert holder(tmp_path)["pid"] == os.getpid()
    with run_lock(tmp_path / "other", rank=1):
        assert not (tmp_path / "other" / ".ufo.lock").exists()


# ----- a full disk -----


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_mid_write_leaves_the_old_file_and_no_temp_file(good, tmp_path, monkeypatch):
    import ufo.checkpoint as ck

    f = tmp_path / "model.safetensors"
    shutil.copy(good["task_model"], f)
    before = f.read_bytes()
    tensors, manifest = load_checkpoint(f)

    def half_then_full(t, path, metadata=None):
        Path(path).write_bytes(before[: len(before) // 2])
        _enospc()

    monkeypatch.setattr(ck, "save_file", half_then_full)
    with pytest.raises(UFOError) as e:
        save_checkpoint(f, tensors, manifest)
    assert str(e.value) == f"cannot write {f}: No space left on device"
    assert f.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["model.safetensors"]


def test_disk_full_through_the_cli_is_one_line(good, tmp_path, monkeypatch):
    import ufo.checkpoint as ck

    monkeypatch.setattr(ck, "save_file", _enospc)
    out = tmp_path / "e.safetensors"
    res = _cli(["extract", str(good["run"]), "-t", "digits", "--out", str(out)])
    _assert_one_line_exit_2(res, f"cannot write {out}: No space left on device")
    assert os.listdir(tmp_path) == []
    # an OSError that escapes elsewhere (here: the config a command reads) is one line as well
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda *a, **k: (_ for _ in ()).throw(
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "cfg.yaml"))
        ),
    )
    res = _cli(["data", "show", str(tmp_path / "cfg.yaml")])
    _assert_one_line_exit_2(res)
