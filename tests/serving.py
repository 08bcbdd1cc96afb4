"""REST serving helpers for tests: start `mlflow models serve` on a free port and post to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port: int, payload) -> tuple[int, dict]:
    """POST a JSON payload (or raw bytes) to /invocations: (HTTP status, decoded body)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def frame(values: list) -> dict:
    """A one-column `image` DataFrame in MLflow's dataframe_split format."""
    return {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}


@contextmanager
def serve(root: Path, model: str, timeout: float = 180) -> Iterator[int]:
    """Serve `model` from the project at `root` (its sqlite store) until the block ends; yields the port."""
    import pytest

    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    log_path = root / f"serve-{port}.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", model, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("mlflow models serve did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.5)
        yield port
    finally:
        # The server runs in its own session: stop its workers too, never anything else.
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
