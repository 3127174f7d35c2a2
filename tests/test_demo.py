"""The pieces of `make demo-tiny`: held-out questions, greedy accuracy, the metrics plot."""

from __future__ import annotations

import pytest
from conftest import _load_example

evaluate = _load_example("evaluate")
summarize_run = _load_example("summarize_run")


def test_heldout_questions_are_not_trained_on(tiny_dir):
    train = evaluate.read_jsonl(tiny_dir / "data" / "train.jsonl")
    heldout = evaluate.read_jsonl(tiny_dir / "data" / "heldout.jsonl")
    assert len(heldout) >= 80
    asked = {(ex["instruction"], ex["input"]) for ex in train}
    assert not any((ex["instruction"], ex["input"]) in asked for ex in heldout)


def test_accuracy_counts_exact_greedy_answers(tiny_dir, monkeypatch):
    model, tokenizer = evaluate.load(tiny_dir / "model")
    examples = evaluate.read_jsonl(tiny_dir / "data" / "heldout.jsonl")[:4]
    answer = evaluate.greedy_answer(model, tokenizer, examples[0], max_new_tokens=3)
    assert isinstance(answer, str)
    answers = iter([examples[0]["output"], "wrong", examples[2]["output"], " "])
    monkeypatch.setattr(evaluate, "greedy_answer", lambda *args, **kwargs: next(answers))
    assert evaluate.accuracy(model, tokenizer, examples) == pytest.approx(0.5)


def test_the_metrics_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    logs = [
        {"loss": -0.1 * i, "otr/ce": 2.0 - 0.1 * i, "otr/p_target": 0.1 * i,
         "otr/hit_rate": 0.05 * i, "otr/entropy": 3.0 - 0.1 * i}
        for i in range(5)
    ]  # fmt: skip
    log_file = tmp_path / "run.log"
    log_file.write_text("\n".join(str(log) for log in logs))
    png = tmp_path / "adapter" / "otr_metrics.png"
    assert summarize_run.main([str(log_file), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="nothing to plot"):
        summarize_run.plot([{"eval_loss": 1.0}], tmp_path / "empty.png")
