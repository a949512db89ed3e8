"""`nanoseek serve` (or any OpenAI-compatible server command) as a child process on a loopback port, waited for
until it answers: what the server tests and the serving benchmarks start their servers with."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from nanoseek.errors import NanoseekError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(process: subprocess.Popen, url: str, timeout: float) -> None:
    """Polls url until it answers 200; the server's last stderr in the error if it exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    process.kill()
    error = process.stderr.read().decode(errors="replace")[-2000:] if process.stderr else ""
    raise NanoseekError(f"the server at {url} did not start within {timeout:g} s: {error}")


def start_serve(
    model_dir: str | Path, *flags: str, timeout: float = 120.0, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`nanoseek serve model_dir --fd N *flags` → (the process, its base URL), once /health answers 200. The
    listening socket is bound here, on a port the OS picks, and handed to the child open: no other process can
    take the port between its choice and the server's start."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        port = listener.getsockname()[1]
        process = subprocess.Popen(
            [sys.executable, "-m", "nanoseek", "serve", str(model_dir), "--fd", str(listener.fileno()), *flags],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=(listener.fileno(),),
        )
    base = f"http://127.0.0.1:{port}"
    wait_until_up(process, f"{base}/health", timeout)
    return process, base
