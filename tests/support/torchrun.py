"""Launch a test worker module on N local CPU processes with torchrun.

One place for the command line the distributed tests share: the repository on
PYTHONPATH (workers run as modules), one thread per process (2 cores), and a free
port from the kernel, so tests that run at once (pytest-xdist) never share a
rendezvous port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port no one listens on now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(
    module: str, args: list[str], processes: int, timeout: int, **env_extra: str
) -> subprocess.CompletedProcess:
    """Run ``python -m module *args`` on ``processes`` ranks; output captured, not checked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env_extra}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", module, *map(str, args),
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
