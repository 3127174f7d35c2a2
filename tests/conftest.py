"""Shared fixtures: the tiny offline model and its configs. Helpers live in tests/support."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
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


@pytest.fixture(scope="session")
def adapter(tiny_dir, tmp_path_factory) -> Path:
    """One LoRA adapter on the tiny model (q/v projections, rank 4) with nonzero B, saved
    once: the common start of runs that are compared (HF Trainer and `axolotl train`'s
    ``lora_model_dir``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model", dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    model.save_pretrained(out)
    return out
