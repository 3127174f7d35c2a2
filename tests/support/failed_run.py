"""Running `axolotl train` on a config that must fail: the exit status and what was printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .axolotl_cli import OFFLINE_ENV
from .examples import REPO

# What accelerate's single-process launcher adds after the training process fails: its own
# traceback (it raises CalledProcessError unless launched with --quiet).
LAUNCHER_TRACEBACK = "Traceback (most recent call last):"
# A tqdm progress bar's line ("  75%|███████▌  | 6/8 [00:03<00:01,  1.92it/s]"): the
# Trainer's bar is closed, and prints its last state, when the failed process exits.
PROGRESS_BAR = re.compile(r"^\s*\d+%\|.*\| *\d+/\d+ \[")


def run_axolotl_train_failing(config: Path, *extra: str, timeout: int = 600) -> list[str]:
    """Run `axolotl train` as a user would; assert it fails; return the printed lines."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **OFFLINE_ENV, "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(
        [os.path.join(venv_bin, "axolotl"), "train", str(config), *extra],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-6000:]
    return output.rstrip().splitlines()


def last_line_before_the_launcher(lines: list[str]) -> tuple[str, list[str]]:
    """The training process's last line (its progress bar and blank lines aside), and
    the launcher's lines printed after it.

    stderr is read after stdout, and the launcher writes its traceback last, so its
    lines are the tail that starts at the last traceback header (when it printed one).
    """
    starts = [i for i, line in enumerate(lines) if line.startswith(LAUNCHER_TRACEBACK)]
    tail = lines[starts[-1] :] if starts and "CalledProcessError" in lines[-1] else []
    own = [
        line for line in lines[: len(lines) - len(tail)]
        if line.strip() and not PROGRESS_BAR.match(line)
    ]  # fmt: skip
    return own[-1], tail
