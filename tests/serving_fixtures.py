"""launch/serve.py as a subprocess on a free port, for the serving tests: started, waited for
(its /health), and stopped however the test module ends."""

import contextlib
import os
import socket
import subprocess
import sys
import time

import httpx

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_py(ckpt: str, log_path, *args: str, env: dict | None = None, timeout: float = 300):
    """The base URL of launch/serve.py serving `ckpt` with `args`, its output in `log_path`; `env`:
    its whole environment (default: this process's, on CPU)."""
    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch" / "serve.py"), "--checkpoint", ckpt,
                             "--port", str(port), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env or dict(os.environ, JAX_PLATFORMS="cpu"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    try:  # the server is stopped however the module ends, a failed start included
        while True:
            assert proc.poll() is None, open(log_path).read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, f"the server did not start in {timeout} s:\n" + open(log_path).read()[-3000:]
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
