"""What the Python suites share to run runbridge's binaries for real: a free
port, a wait until a process answers over HTTP, and the whole stack
(`runbridge emulate` and `runbridge all` against this machine's RabbitMQ
and Redis) for the suites that need it. Each suite puts this folder on
``sys.path``; the binary is ``RUNBRIDGE_BIN`` or target/debug/runbridge.
"""

import os
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

ROOT = Path(__file__).resolve().parents[2]


def binary() -> Path:
    path = Path(os.environ.get("RUNBRIDGE_BIN", ROOT / "target" / "debug" / "runbridge"))
    if not path.exists():
        pytest.fail(f"{path} not found: run `cargo build` first")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, what: str, seconds: float = 30) -> None:
    """Until ``url`` answers 2xx; fails with the process's stderr if it exits."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            pytest.fail(f"{what} exited: {err}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:  # refused, or not ready yet (an HTTP error status)
            time.sleep(0.1)
    proc.kill()
    pytest.fail(f"{what} did not come up at {url} within {seconds:g} s")


@dataclass
class Stack:
    binary: Path
    env: Dict[str, str]
    emulator: str
    sidecar: str


@contextmanager
def running(settings: Dict[str, str], emulator_args: List[str]) -> Iterator[Stack]:
    """`runbridge emulate` (with ``emulator_args``) and `runbridge all` in
    development mode, with ``settings`` (RUNBRIDGE__... names and values,
    for the suite's own key prefix and broker names) over the ports and
    URLs this picks; stopped at the end."""
    exe = binary()
    emu_port, sidecar_port = free_port(), free_port()
    env = dict(
        os.environ,
        RUNBRIDGE_ENV="local",
        RUNBRIDGE_CONFIG_DIR=str(ROOT / "config"),
        RUNBRIDGE__SIDECAR__LISTEN=f"127.0.0.1:{sidecar_port}",
        RUNBRIDGE__SIDECAR__PUBLIC_URL=f"http://127.0.0.1:{sidecar_port}",
        DATABRICKS_HOST=f"http://127.0.0.1:{emu_port}",
        RUST_LOG="warn",
        **settings,
    )
    procs = []

    def start(*args: str) -> subprocess.Popen:
        p = subprocess.Popen([str(exe), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        return p

    try:
        emulator = start("emulate", "--listen", f"127.0.0.1:{emu_port}", *emulator_args)
        wait_http(f"http://127.0.0.1:{emu_port}/emulator/stats", emulator, "the emulator")
        bridge = start("all")
        wait_http(f"http://127.0.0.1:{sidecar_port}/readyz", bridge, "runbridge all")
        yield Stack(exe, env, f"http://127.0.0.1:{emu_port}", f"http://127.0.0.1:{sidecar_port}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=40)
            except subprocess.TimeoutExpired:
                p.kill()
