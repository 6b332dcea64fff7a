"""A real Triton Inference Server for the tests: tritonserver 2.51.0 from the nvidia-pytriton wheel.

scripts/setup.sh installs the wheel into .venv/triton, a venv holding numpy 1.x layered over .venv's packages:
Triton 2.51's Python backend breaks under numpy 2 (README.md, "Triton Inference Server"), so the model repository
names .venv/triton as the model's EXECUTION_ENV_PATH and the backend stub runs there. The wheel's layout:
pytriton/tritonserver/{bin/tritonserver, backends/python, caches, python_backend_stubs/3.X/} and its libraries in
nvidia_pytriton.libs/ (LD_LIBRARY_PATH). The stub for this Python version is copied next to the Python backend
in a temporary backend directory (the layout tritonserver expects: BACKENDS/python/triton_python_backend_stub).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TRITON_ENV = Path(sys.prefix) / "triton"  # made by scripts/setup.sh
READY_TIMEOUT_S = 90  # the repository loads in 2-7 s on a 2-core machine; margin for a loaded CI host
STOP_TIMEOUT_S = 30  # tritonserver's --exit-timeout-secs below, plus the stubs' own shutdown


def _wheel_root() -> Path:
    found = sorted(TRITON_ENV.glob("lib/python3*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    assert found, f"no tritonserver under {TRITON_ENV}: run scripts/setup.sh (installs nvidia-pytriton there)"
    return found[0].parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_directory(out: Path) -> Path:
    """OUT/python = the wheel's Python backend plus the stub built for this interpreter's Python version."""
    root = _wheel_root()
    shutil.copytree(root / "backends" / "python", out / "python", dirs_exist_ok=True)
    stub = root / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    shutil.copy2(stub, out / "python" / stub.name)
    return out


@dataclass
class Server:
    process: subprocess.Popen
    http_url: str
    grpc_url: str
    log: Path
    metrics_url: str | None = None  # Triton's Prometheus endpoint (http://host:port/metrics), when started with it

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGINT (tritonserver's clean shutdown: unload models, stop the stubs); its exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return -9
        return self.process.returncode


def start(repo: Path, work: Path, metrics: bool = False) -> Server:
    """Start tritonserver on free loopback ports and wait until the server and its models are ready; `metrics`:
    with its metrics endpoint (CPU metrics only) on a free loopback port too."""
    import tritonclient.http as http

    root = _wheel_root()
    http_port, grpc_port, metrics_port = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": str(root.parents[1] / "nvidia_pytriton.libs")}
    log = work / "tritonserver.log"
    cmd = [str(root / "bin" / "tritonserver"), "--model-repository", str(repo),
           "--backend-directory", str(backend_directory(work / "backends")),
           "--cache-directory", str(root / "caches"),
           "--http-address", "127.0.0.1", "--http-port", str(http_port),
           "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc_port),
           "--exit-timeout-secs", "10", "--log-info", "true"]
    cmd += (["--allow-metrics", "true", "--allow-gpu-metrics", "false", "--metrics-address", "127.0.0.1",
             "--metrics-port", str(metrics_port)] if metrics else ["--allow-metrics", "false"])
    with open(log, "wb") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=work)
    server = Server(process, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", log,
                    f"http://127.0.0.1:{metrics_port}/metrics" if metrics else None)
    client = http.InferenceServerClient(server.http_url)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tritonserver exited {process.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if client.is_server_ready():
                return server
        except Exception:  # not listening yet
            pass
        time.sleep(0.25)
    server.stop()
    raise AssertionError(f"tritonserver not ready after {READY_TIMEOUT_S} s:\n{server.log_text()[-4000:]}")


def rss_bytes(server: Server) -> int:
    """Resident memory of tritonserver and its backend stub processes together."""
    import psutil

    proc = psutil.Process(server.process.pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
