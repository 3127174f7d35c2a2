"""Shared fixtures: the tiny offline model, its configs, and running `axolotl train`."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "examples" / "configs" / "tiny-cpu-lora.yml"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}
os.environ.update(OFFLINE_ENV)
sys.path.insert(0, str(Path(__file__).parent))


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / "tiny" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


parse_logs = _load_example("summarize_run").parse_logs


@pytest.fixture
def recorded_draws(monkeypatch) -> list:
    """Every batch of tokens the sampled estimator draws, in order (the loss is unchanged)."""
    import axolotl_otr.chunk_math as chunk_math

    draws = []
    original = chunk_math.sample_tokens

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(chunk_math, "sample_tokens", recording)
    return draws


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny model, tokenizer and data, built once per test session."""
    out = tmp_path_factory.mktemp("tiny")
    _load_example("build_tiny").build(out, seed=0)
    return out


@pytest.fixture
def tiny_config(tiny_dir, tmp_path):
    """The shipped tiny YAML as a dict, with absolute paths into this test's tmp dir."""

    def make(**overrides) -> dict:
        cfg = yaml.safe_load(TINY_CONFIG.read_text())
        cfg["base_model"] = str(tiny_dir / "model")
        cfg["datasets"][0]["path"] = str(tiny_dir / "data" / "train.jsonl")
        cfg["dataset_prepared_path"] = str(tmp_path / "prepared")
        cfg["output_dir"] = str(tmp_path / "out")
        cfg.update(overrides)
        return {k: v for k, v in cfg.items() if v is not None}

    return make


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
