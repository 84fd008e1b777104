"""One writer per run folder: an exclusive, non-blocking `flock` on FOLDER/.ufo.lock.

Every command that writes into a run folder (train, run, eval, extend, distill, search, report)
holds the lock for its whole duration, so a second process on the same folder fails at once with
the holder's pid and command instead of interleaving its checkpoints with the first. The kernel
drops a flock when its holder dies, so a killed run can resume at once; the file itself stays
(removing it would race with a process that has just opened it).

The lock is re-entrant within a process (`ufo train` locks before writing config.yaml, then the
trainer locks again), and under torchrun only global rank 0 takes it: the other ranks write
nothing into the folder, and a second launch fails on its rank 0.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import inspect
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ufo.errors import RunLockedError, StorageError

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".ufo.lock"
_held: dict[str, list[int]] = {}  # resolved folder -> [fd, depth]
_guard = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


def _command() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:500] if sys.argv else "python"


def holder(folder: str | Path) -> dict[str, Any] | None:
    """What the lock file of `folder` says about its last holder (pid, command, started), if anything."""
    try:
        info = json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "pid unknown"
    return f"pid {info.get('pid', '?')}, `{info.get('command', '?')}`, since {info.get('started', '?')}"


def _acquire(folder: Path) -> int:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise StorageError(f"cannot create the lock file {folder / LOCK_NAME}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunLockedError(
            f"{folder} is in use by another ufo process ({_describe(holder(folder))}); wait for it to finish or stop it"
        ) from None
    except OSError as e:  # a file system without locks: run unguarded rather than not at all
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
            os.close(fd)
            raise StorageError(f"cannot lock {folder / LOCK_NAME}: {e.strerror or e}") from None
        return fd
    info = {
        "pid": os.getpid(),
        "command": _command(),
        "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    except OSError:
        pass  # a full disk must not stop the lock itself; the holder is then reported as unknown
    return fd


@contextlib.contextmanager
def run_lock(folder: str | Path, rank: int | None = None, create: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of run folder `folder` (created if missing) for the `with` body.
    Raises RunLockedError at once, naming the holder, if another process holds it. `rank`
    (default: the RANK variable torchrun sets) other than 0 takes no lock. With `create=False`
    a missing folder is not created and not locked (the caller then fails on the missing files)."""
    folder = Path(folder)
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    if fcntl is None or rank != 0 or not (create or folder.is_dir()):
        yield folder
        return
    key = str(folder.resolve())
    with _guard:
        entry = _held.get(key)
        if entry is None:
            entry = _held[key] = [_acquire(folder), 0]
        entry[1] += 1
    try:
        yield folder
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                os.close(entry[0])  # closing the last descriptor releases the flock


def locks(param: str, create: bool = True) -> Callable[[F], F]:
    """Decorator: hold the run lock of the folder passed as argument `param` for the whole call."""

    def deco(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with run_lock(sig.bind(*args, **kwargs).arguments[param], create=create):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
