"""Memory under concurrent large images (issue 21): the real `ufo serve` in a subprocess, six clients
sending 5000 x 5000 PNGs at once (small on the wire, 25 M pixels decoded each), with the decode
budget at two such images. The server's RSS is sampled throughout; its growth over the idle RSS must
stay within what the budget allows, every answer is 200 or 503 busy, and the next request succeeds."""

from __future__ import annotations

import io
import threading
import time

import httpx
from PIL import Image

from test_hardening import model_file  # noqa: F401  (the tiny task model fixture)
from ufo.deploy.process import ServeProcess

SIDE = 5000
PIXELS = SIDE * SIDE  # 25 M
IN_FLIGHT = 2 * PIXELS  # --max-pixels-in-flight: two large images decode at once, the others wait
CLIENTS = 6
# PIL holds RGB at 4 bytes a pixel; a decode makes up to ~3 such buffers at once (the decoded image, its numpy
# copy, the copy PIL makes again to resize), so: growth <= pixels in flight x 4 bytes x 3 + 200 MiB (torch, threads,
# allocator slack) = 572 + 200 = 772 MiB. Measured: +372 MiB; with the budget at six images instead, +956 MiB fails it.
BYTES_PER_PIXEL, TEMPORARIES, MARGIN = 4, 3, 200 * 2**20
BOUND = IN_FLIGHT * BYTES_PER_PIXEL * TEMPORARIES + MARGIN


def _png(side: int, colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), colour).save(buf, "PNG")
    return buf.getvalue()


def test_concurrent_large_images_keep_rss_within_the_decode_budget(model_file):  # noqa: F811
    small = _png(16, (10, 20, 30))
    large = [_png(SIDE, (40 * i, 255 - 40 * i, 128)) for i in range(CLIENTS)]
    assert max(map(len, large)) < 1_000_000  # small on the wire: the memory is the server's decoding
    with ServeProcess([str(model_file), "--max-pixels-in-flight", str(IN_FLIGHT)], threads=1) as server:
        server.wait_ready(120)
        url = server.url + "/v1/tasks/digits:predict"
        for _ in range(3):  # warm: first-call allocations are not the images'
            assert httpx.post(url, content=small, timeout=30).status_code == 200
        idle = server.rss()
        peak, stop = [idle], threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], server.rss())
                time.sleep(0.01)

        answers: list[tuple[int, str]] = []

        def client(png: bytes) -> None:
            r = httpx.post(url, content=png, timeout=60)
            answers.append((r.status_code, r.json().get("error", "") if r.status_code != 200 else ""))

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(png,)) for png in large]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        wall = time.perf_counter() - t0
        time.sleep(0.5)
        stop.set()
        sampler.join()
        after = server.rss()
        ok = httpx.post(url, content=small, timeout=30)
        mb = 2**20
        print(
            f"\nmemory: idle {idle / mb:.0f} MiB, peak {peak[0] / mb:.0f} MiB (+{(peak[0] - idle) / mb:.0f} MiB, "
            f"bound +{BOUND / mb:.0f} MiB), after {after / mb:.0f} MiB; {CLIENTS} x {SIDE}x{SIDE} in {wall:.1f} s, "
            f"answers {sorted(answers)}"
        )
        assert len(answers) == CLIENTS and all(a in ((200, ""), (503, "busy")) for a in answers), answers
        assert peak[0] - idle <= BOUND, f"RSS grew by {(peak[0] - idle) / mb:.0f} MiB > {BOUND / mb:.0f} MiB"
        assert ok.status_code == 200 and ok.json()["top_k"]
        assert server.proc.poll() is None
