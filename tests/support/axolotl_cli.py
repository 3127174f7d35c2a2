"""Running the `axolotl` command line as a user would, on configs written by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from .examples import REPO, parse_logs

TINY_CONFIG = REPO / "examples" / "configs" / "tiny-cpu-lora.yml"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_axolotl_train(config: Path, timeout: int = 600) -> tuple[str, list[dict]]:
    """Run `axolotl train` as a user would; return its output and the parsed log dicts."""
    return run_axolotl(["train", str(config)], timeout)


def run_axolotl(args: list[str], timeout: int = 600) -> tuple[str, list[dict]]:
    """Run the `axolotl` command line with ``args``; return its output and log dicts."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **OFFLINE_ENV, "PATH": venv_bin + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(
        [os.path.join(venv_bin, "axolotl"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output, parse_logs(output)
