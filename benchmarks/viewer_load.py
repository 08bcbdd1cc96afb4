"""Load test of `cytopipe view` on loopback: tile requests from several threads against a real slide.

    python benchmarks/viewer_load.py [--report /tmp/csf_report] [--slide SLIDE] [--requests 2000] [--threads 8]

The server runs as `cytopipe view` in a child process (its peak RSS is the child's VmHWM); each client
thread keeps one HTTP/1.1 connection and asks for random tiles of the three most detailed Deep Zoom
levels (mostly cache misses: every tile is read from the slide and encoded) and a few of the coarser
ones. Prints wall time, requests/s, errors and peak RSS. Targets (issue 17): 0 errors, RSS < 1.5 GiB.
"""

from __future__ import annotations

import argparse
import http.client
import math
import random
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TILE = 254


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(conn: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    conn.request("GET", path)
    resp = conn.getresponse()
    return resp.status, resp.read()


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 60) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            status, body = get(http.client.HTTPConnection("127.0.0.1", port, timeout=5), "/slide.dzi")
            if status == 200:
                return body.decode()
        except OSError:
            time.sleep(0.2)
    sys.exit("the server did not answer within a minute")


def tile_paths(dzi: str, n: int, seed: int = 0) -> list[str]:
    """n tile paths: 90% from the three most detailed levels, 10% from the coarser ones."""
    w, h = (int(v) for v in re.search(r'Width="(\d+)" Height="(\d+)"', dzi).groups())
    dims = [(w, h)]
    while dims[-1] != (1, 1):
        dims.append((max(1, math.ceil(dims[-1][0] / 2)), max(1, math.ceil(dims[-1][1] / 2))))
    dims.reverse()  # Deep Zoom level 0 is 1x1
    rng = random.Random(seed)
    top = len(dims) - 1
    paths = []
    for _ in range(n):
        level = rng.choice(range(top - 2, top + 1)) if rng.random() < 0.9 else rng.randrange(0, top - 2)
        cols, rows = (math.ceil(d / TILE) for d in dims[level])
        paths.append(f"/slide_files/{level}/{rng.randrange(cols)}_{rng.randrange(rows)}.jpeg")
    return paths


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report", default="/tmp/csf_report")
    ap.add_argument("--slide", default=None)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=8)
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "pipeline.cli", "view", args.report, "--port", str(port)]
    proc = subprocess.Popen(cmd + (["--slide", args.slide] if args.slide else []), cwd=ROOT)
    try:
        paths = tile_paths(wait_ready(port, proc), args.requests)
        errors, done, lock = [], [0], threading.Lock()

        def client(mine: list[str]) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            for path in mine:
                try:
                    status, body = get(conn, path)
                    ok = status == 200 and body[:2] == b"\xff\xd8"
                except OSError as exc:
                    ok, status = False, repr(exc)
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                with lock:
                    done[0] += 1
                    if not ok:
                        errors.append(f"{path}: {status}")
            conn.close()

        threads = [threading.Thread(target=client, args=(paths[i :: args.threads],)) for i in range(args.threads)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        rss = peak_rss(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(f"requests: {done[0]} tile requests from {args.threads} threads")
    print(f"wall time: {wall:.2f} s")
    print(f"requests/s: {done[0] / wall:.1f}")
    print(f"errors: {len(errors)}" + (f" (first: {errors[:3]})" if errors else ""))
    print(f"server peak RSS: {rss / 2**20:.0f} MiB (target < 1536 MiB)")
    return 1 if errors or rss >= 1.5 * 2**30 else 0


if __name__ == "__main__":
    sys.exit(main())
