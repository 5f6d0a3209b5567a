"""A real MLflow tracking server for tests: `mlflow server` from the repository's .venv-mlflow (built
on first use with `make .venv-mlflow/.installed`), SQLite backend, artifacts in a folder, on
127.0.0.1 only."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from llama_core.launch.preflight import free_port

REPO = Path(__file__).resolve().parents[1]
VENV = REPO / ".venv-mlflow"
START_TIMEOUT_S = 120


def mlflow_executable() -> Path:
    """The `mlflow` command of .venv-mlflow, building that venv first if needed (fails with make's output)."""
    proc = subprocess.run(
        ["make", "-C", str(REPO), ".venv-mlflow/.installed"], capture_output=True, text=True, timeout=1800
    )
    if proc.returncode != 0:
        pytest.fail(f"building .venv-mlflow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return VENV / "bin" / "mlflow"


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port>, its store in `folder`; `stop()` ends it."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "server.log"
        cmd = [
            str(mlflow_executable()), "server",
            "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--artifacts-destination", str(folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            # its own process group: stop() ends the server and the workers it started
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_healthy()

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    healthy = answer.status == 200
            except OSError:
                time.sleep(0.3)
                continue
            if healthy:  # the first API call loads the server's stores (seconds): not the tracker's to wait
                search = f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1"
                with urllib.request.urlopen(search, timeout=START_TIMEOUT_S):
                    return
        self.stop()
        pytest.fail(f"mlflow server not healthy in {START_TIMEOUT_S} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """End the server (SIGTERM: as an operator stops it, in ~8 s; SIGKILL: at once)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
