"""A careless user through `axolotl train` (issue 35): a misspelt key is refused in one
line, a set without targets and a dead model stop non-zero with nothing saved as final,
two runs of one config agree, and no perplexity of the OTR loss is logged.
"""

from __future__ import annotations

import json

import pytest

from tests.support.axolotl_cli import run_axolotl_train, write_config
from tests.support.failed_run import last_line_before_the_launcher, run_axolotl_train_failing

pytestmark = pytest.mark.integration


def assert_stopped_unsaved(lines: list[str], out) -> str:
    """The run failed with OTR's message as the training process's last line, and
    Axolotl neither reported nor saved a completed training."""
    message, launcher = last_line_before_the_launcher(lines)
    assert len(launcher) <= 12, launcher  # accelerate's own traceback, nothing of ours
    assert not any("Training completed" in line for line in lines)
    assert not (out / "adapter_model.safetensors").exists(), sorted(p.name for p in out.iterdir())
    return message


def test_a_misspelt_key_is_the_last_line_before_the_launchers_traceback(tiny_config, tmp_path):
    cfg = tiny_config(otr_temprature=2.0, max_steps=2)
    lines = run_axolotl_train_failing(write_config(cfg, tmp_path / "typo.yml"))
    message, launcher = last_line_before_the_launcher(lines)
    assert message.endswith(
        "unknown config key `otr_temprature`: Axolotl would drop it "
        "silently and train without it; did you mean `otr_temperature`?"
    )
    assert launcher[-1].startswith("subprocess.CalledProcessError"), launcher


def test_a_set_without_targets_stops_before_the_first_step(tiny_dir, tiny_config, tmp_path):
    train = (tiny_dir / "data" / "train.jsonl").read_text()
    rows = [json.loads(line) for line in train.splitlines()]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({**row, "output": ""}) + "\n" for row in rows[:32]))
    cfg = tiny_config(max_steps=2)
    cfg["datasets"][0]["path"] = str(empty)
    lines = run_axolotl_train_failing(write_config(cfg, tmp_path / "empty.yml"))
    message = assert_stopped_unsaved(lines, tmp_path / "out")
    assert "OTR: the training set has no target tokens" in message and "train_on_inputs" in message
    assert not any("'loss'" in line for line in lines)  # not one step trained


def test_a_dead_model_stops_non_zero_unsaved(tiny_config, tmp_path):
    cfg = tiny_config(max_steps=8, learning_rate=1000.0)
    lines = run_axolotl_train_failing(write_config(cfg, tmp_path / "dead.yml"))
    message = assert_stopped_unsaved(lines, tmp_path / "out")
    assert "OTR stopped the run at step" in message and "the model has collapsed" in message


def test_two_runs_of_one_config_agree_and_log_no_perplexity_of_the_otr_loss(tiny_config, tmp_path):
    runs = []
    for name in ("first", "second"):
        cfg = tiny_config(max_steps=2, output_dir=str(tmp_path / name))
        runs.append(run_axolotl_train(write_config(cfg, tmp_path / f"{name}.yml"))[1])
    first, second = ([log for log in logs if "loss" in log] for logs in runs)
    # Axolotl 0.19 does not seed the LoRA initialisation; under OTR `seed` does.
    assert [log["grad_norm"] for log in first] == [log["grad_norm"] for log in second]
    assert [log["loss"] for log in first] == [log["loss"] for log in second]
    assert not any({"ppl", "eval_ppl"} & set(log) for log in runs[0]), runs[0]
    assert all("otr/ppl" in log for log in first)
