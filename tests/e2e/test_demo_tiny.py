"""The pieces of `make demo-tiny`: held-out questions, greedy accuracy, the metrics plot."""

from __future__ import annotations

import pytest

from examples.tiny import evaluate, summarize_run


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


def _real_run_output(steps: int = 100, eval_every: int = 50) -> str:
    """Console output shaped like an `axolotl train` run under OTR: one log dict per step,
    the first alone carrying the first-window measures, eval logs in between, and the
    end-of-training summary (which the reader must not take for a step)."""
    lines = ["[axolotl] loading model", "{'train_runtime': 0.5}"]
    for step in range(1, steps + 1):
        log = {
            "loss": f"{-0.64 + 0.001 * step:.4f}", "grad_norm": 1.5, "learning_rate": 2e-4,
            "otr/ce": 2.0 - 0.01 * step, "otr/p_target": 0.3 + 0.005 * step,
            "otr/hit_rate": 0.2 + 0.004 * step, "otr/entropy": 3.0 - 0.01 * step,
            "epoch": step / steps,
        }  # fmt: skip
        if step == 1:
            log.update({"otr/first_window_p_target": 0.73, "otr/first_window_argmax_share": 0.8})
        lines.append(f"{log}")
        if step % eval_every == 0:
            lines.append(f"{ {'eval_loss': -0.5, 'eval_otr/ce': 1.5, 'epoch': step / steps} }")
    lines.append("{'train_runtime': 143.2, 'train_loss': -0.6, 'epoch': 1.0}")
    return "\n".join(lines)


def test_the_summary_reads_a_run_whose_first_log_has_extra_keys(tmp_path):
    """The crash of `make demo` (KeyError 'otr/first_window_p_target'): the summary took
    its keys from the first log, which alone carries the first-window measures."""
    log_file = tmp_path / "run.log"
    log_file.write_text(_real_run_output())
    logs = summarize_run.parse_logs(log_file.read_text())
    assert sum("loss" in log for log in logs) == 100
    assert sum("eval_loss" in log for log in logs) == 2
    text = summarize_run.summarize(logs)
    # First and last tenth (10 steps each): otr/ce 2.0 - 0.01 * step, means at 5.5 and 95.5.
    assert "cross-entropy on the targets 1.9450 -> 1.0450" in text
    assert "p(target) 0.3275 -> 0.7775" in text
    png = tmp_path / "otr_metrics.png"
    assert summarize_run.main([str(log_file), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_summary_mean_skips_logs_without_a_key():
    logs = [{"loss": 1.0, "otr/ce": 2.0, "extra": 5.0}, {"loss": 3.0, "otr/ce": 4.0}]
    means = summarize_run._mean(logs, ("loss", "otr/ce", "extra", "absent"))
    assert means["loss"] == 2.0 and means["otr/ce"] == 3.0 and means["extra"] == 5.0
    assert means["absent"] != means["absent"]  # NaN: no log carries it
