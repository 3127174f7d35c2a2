"""The first optimizer step's token measures (the base model on the fine-tuning data) and
the one line that places them on the measured map, inside a real HF Trainer."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from axolotl_otr import map_reading
from axolotl_otr.metrics import FIRST_WINDOW_KEYS
from axolotl_otr.objective import Objective, OTRSettings
from axolotl_otr.trainer import with_otr
from tests.support.trainer_setup import build_trainer, make_examples

VOCAB = 512
P_KEY, SHARE_KEY = FIRST_WINDOW_KEYS["p_target"], FIRST_WINDOW_KEYS["argmax_share"]


def direct_measures(model_dir, examples) -> tuple[float, float]:
    """Teacher-forced mean p(target) and argmax share of the untrained model."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    batch = {k: torch.stack([e[k] for e in examples]) for k in ("input_ids", "attention_mask")}
    labels = torch.stack([e["labels"] for e in examples])[:, 1:]
    with torch.no_grad():
        logits = model(**batch).logits[:, :-1].float()
    mask = labels != -100
    target = labels.clamp(min=0)
    p = logits.softmax(-1).gather(-1, target[..., None])[..., 0][mask]
    hit = (logits.argmax(-1) == target)[mask]
    return p.double().mean().item(), hit.double().mean().item()


def with_argmax_targets(examples, model_dir):
    """Every other target made the base model's greedy token (left to right, so each one
    is the argmax given the tokens before it), so the share is far from 0."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    for e in examples:
        ids = e["input_ids"].clone()
        scored = (e["labels"] != -100).nonzero().view(-1).tolist()
        for t in scored[::2]:
            with torch.no_grad():
                ids[t] = model(input_ids=ids[None, :t]).logits[0, -1].argmax()
        e["input_ids"] = ids
        e["labels"] = torch.where(e["labels"] != -100, ids, e["labels"])
    return examples


@pytest.mark.parametrize("fused,logging_steps", [(True, 1), (False, 1), (True, 2)])
def test_first_window_measures_are_the_base_models_on_its_batches(
    tiny_dir, tmp_path, fused, logging_steps
):
    model_dir = tiny_dir / "model"
    # 4 examples, 2 per micro-batch, GA 2: the first window holds all of them (in any
    # order); later steps see them again, after updates
    examples = with_argmax_targets(make_examples(4, VOCAB), model_dir)
    trainer, _, logs = build_trainer(
        model_dir, tmp_path, examples, micro_batch=2, accumulation=2,
        max_steps=2 * logging_steps, logging_steps=logging_steps, learning_rate=5e-2,
        settings=OTRSettings(Objective(num_samples=8), fused=fused),
    )  # fmt: skip
    trainer.train()
    train_logs = [log for log in logs.logs if "loss" in log]
    assert len(train_logs) == 2
    first, second = train_logs
    p, share = direct_measures(model_dir, examples)
    assert 0.3 < share < 1.0
    # with logging_steps 2 the first log comes after the second window: still the first's
    assert first[P_KEY] == pytest.approx(p, rel=1e-4, abs=1e-6)
    assert first[SHARE_KEY] == pytest.approx(share, abs=1e-6)
    if logging_steps == 1:  # the first log's own window is the first window
        assert first["otr/p_target"] == pytest.approx(p, rel=1e-4, abs=1e-6)
    assert P_KEY not in second and SHARE_KEY not in second  # logged once
    assert second["otr/p_target"] != pytest.approx(p, rel=1e-3)  # the model moved


def test_the_map_line_is_printed_once_and_places_the_run(tiny_dir, tmp_path, caplog, monkeypatch):
    level = {"mean": -0.1, "std": 0.01, "n_seeds": 3, "lo": -0.15, "hi": -0.05}
    synthetic = {
        "methods": {"otr_sampled": "pure OTR"},
        "levels": [
            {
                "name": "L",
                "p_target": 0.9,
                "argmax_share": 0.9,
                "differences": {"otr_sampled": level},
            }
        ],
    }
    monkeypatch.setattr(map_reading, "load_map", lambda: synthetic)
    trainer, _, logs = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(8, VOCAB), micro_batch=2, accumulation=2,
        max_steps=2, settings=OTRSettings(Objective(num_samples=4)),
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="axolotl.otr"):
        trainer.train()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("OTR map:")]
    assert len(lines) == 1, lines
    p = next(log for log in logs.logs if "loss" in log)[P_KEY]
    assert f"your p(target) {p:.2f}" in lines[0]
    assert "below the map; nearest level p 0.90" in lines[0]
    assert "pure OTR worse than SFT, otr_sft_mix 0.3 not measured" in lines[0]
    assert len(lines[0]) <= 200


def test_a_run_that_never_logs_a_loss_reads_the_window_at_its_end(tiny_dir, tmp_path, caplog):
    trainer, _, logs = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(4, VOCAB), micro_batch=2, accumulation=1,
        max_steps=2, logging_steps=10, settings=OTRSettings(Objective(num_samples=4)),
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="axolotl.otr"):
        trainer.train()
    assert not any("loss" in log for log in logs.logs)
    (final,) = [log for log in logs.logs if "train_loss" in log]
    assert 0 < final[P_KEY] < 1 and 0 <= final[SHARE_KEY] <= 1
    # the packaged map, whatever it holds, gives one line
    assert sum(r.getMessage().startswith("OTR map:") for r in caplog.records) == 1


def test_inert_without_otr(tiny_dir, tmp_path, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=1, logging_steps=1,
        per_device_train_batch_size=2, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = with_otr(Trainer)(model=model, args=args, train_dataset=make_examples(2, VOCAB))
    with caplog.at_level(logging.INFO, logger="axolotl.otr"):
        trainer.train()
    logged = [log for log in trainer.state.log_history if "loss" in log]
    assert logged and not any(key in logged[0] for key in FIRST_WINDOW_KEYS.values())
    assert "OTR map" not in caplog.text


def test_a_map_that_cannot_be_read_costs_its_line_not_the_run(
    tiny_dir, tmp_path, monkeypatch, caplog
):
    """Any error reading the map (here a level whose difference is not an object, which
    raises AttributeError inside the reader) is a warning; training goes on."""
    broken = {
        "methods": {"otr_sampled": "pure OTR"},
        "levels": [
            {"name": "L", "p_target": 0.9, "argmax_share": 0.9, "differences": {"otr_sampled": 1}}
        ],
    }
    monkeypatch.setattr(map_reading, "load_map", lambda: broken)
    trainer, _, logs = build_trainer(
        tiny_dir / "model", tmp_path, make_examples(4, VOCAB), micro_batch=2, accumulation=1,
        max_steps=2, settings=OTRSettings(Objective(num_samples=4)),
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="axolotl.otr"):
        trainer.train()
    assert sum("loss" in log for log in logs.logs) == 2
    assert "OTR map: not read (AttributeError" in caplog.text
