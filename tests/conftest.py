"""Shared fixtures: the tiny offline model and its configs. Helpers live in tests/support."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from examples.tiny import build_tiny
from tests.support.axolotl_cli import OFFLINE_ENV, TINY_CONFIG

os.environ.update(OFFLINE_ENV)


@pytest.fixture
def recorded_draws(monkeypatch) -> list:
    """Every batch of tokens the sampled estimator draws, in order (the loss is unchanged)."""
    import axolotl_otr.kernels.chunk_math as chunk_math

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
    build_tiny.build(out, seed=0)
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
