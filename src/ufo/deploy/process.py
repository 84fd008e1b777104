"""`ufo serve` in a child process on a free loopback port, for tests, benchmarks and scripts.

    server = ServeProcess(["runs/demo"], threads=1)
    server.wait_ready()          # polls GET /healthz until it answers 200
    ...                          # talk to server.url
    server.stop()

The child runs the same console command a user runs, from the same environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from ufo.taskmodel import DeployError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, args: Sequence[str], threads: int = 1, capture_output: bool = True) -> None:
        """Start `ufo serve ARGS --port <free> --threads THREADS`; its output is kept for errors
        when `capture_output`, else discarded."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "ufo"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.PIPE if capture_output else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [str(exe), "serve", *args, "--port", str(self.port), "--threads", str(threads)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until GET /healthz answers 200; stop the child and raise if it exits or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.proc.stdout.read() if self.proc.stdout else ""
                raise DeployError(f"ufo serve exited with code {self.proc.returncode}: {log[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise DeployError(f"ufo serve did not answer {self.url}/healthz within {timeout:.0f} s")

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
