"""The OTR-vs-SFT study's scorers, item generators, retention probe, cache keys and
paired bootstrap (issue 16). No model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.otr_vs_sft import probe, scoring, stats, tasks
from experiments.otr_vs_sft.common import RunCache
from experiments.otr_vs_sft.paths import RESULTS


def test_an_operand_at_the_end_of_a_cut_reply_is_no_answer() -> None:
    """The issue-16 artifact: "To calculate 7 * 0, we need" was credited for 0."""
    assert not scoring.num_ok("To calculate 7 * 0, we need", "0")
    assert not scoring.num_ok("To calculate 7 * 0, we need", "0", lenient=True)
    assert not scoring.num_ok("7 * 0 = 7", "0", lenient=True)  # the operand is not stated


@pytest.mark.parametrize(
    "reply, answer, strict, lenient",
    [
        ("7 * 8 = 56", "56", True, True),
        ("56", "56", True, True),
        ("**56**", "56", True, True),
        ("The answer is 56.", "56", True, True),
        ("There are 180 minutes in 3 hours.", "180", True, True),
        ("2 kilograms = 2,000 grams", "2000", True, True),
        ("18 + 26 = 44.0", "44", True, True),
        ("Let me see.\n7 * 8 = 56", "56", False, True),  # right, but not on the first line
        ("= 56 + 3 = 59", "56", False, False),  # 56 is an operand of a further sum
        ("7 * 8 = 54", "56", False, False),
        ("", "56", False, False),
    ],
)
def test_numbers_count_only_where_stated(reply, answer, strict, lenient) -> None:
    assert scoring.num_ok(reply, answer) is strict
    assert scoring.num_ok(reply, answer, lenient=True) is lenient


def test_words_and_letters() -> None:
    others = frozenset({"rome", "madrid"})
    assert scoring.word_ok("The capital of France is Paris.", "paris", others=others)
    assert not scoring.word_ok("Paris, Rome or Madrid.", "paris", others=others)  # guesses
    assert scoring.word_ok("Paris, Rome or Madrid.", "paris", lenient=True, others=others)
    assert scoring.letter_ok("The letter after B is C.", "C", others=frozenset("DE"))
    assert not scoring.letter_ok("C, D, E", "C", others=frozenset("DE"))
    assert scoring.letter_ok("The first letter of garden is 'g'.", "G")
    assert not scoring.letter_ok("It's a house.", "S")  # a contraction's tail is no letter
    assert scoring.word_case_ok("BANANA", "BANANA")
    assert not scoring.word_case_ok("banana", "BANANA")
    with pytest.raises(ValueError, match="unknown scorer"):
        scoring.ok("x", {"scorer": "nope", "answer": "x"})


def test_task_items_refuse_a_range_too_small() -> None:
    terms = tasks.Terms("+", (1, 2), (1, 2))  # 4 distinct problems
    got = tasks.items(terms, 4, seed=0)
    assert len({q for q, _ in got}) == 4
    assert all(t.split("=")[-1].strip() == str(eval(t.split("=")[0])) for _, t in got)
    with pytest.raises(ValueError, match="holds 4 distinct problems"):
        tasks.items(terms, 5, seed=0)
    with pytest.raises(ValueError, match="holds 3 distinct"):
        tasks.items(terms, 4, seed=0, exclude={got[0][0]})
    both = tasks.Terms("+", (10, 11), (1, 1), both_orders=True)
    assert len(both.problems()) == 4 and len(tasks.items(both, 4, seed=1)) == 4


def test_scale1_unique_set_refuses_a_range_too_small() -> None:
    from experiments.otr_vs_sft.scale1 import unique_set

    def gen_small(rng):
        a = rng.randint(1, 3)
        return f"{a}=", str(a)

    assert len(unique_set(gen_small, 3, seed=0)) == 3
    with pytest.raises(ValueError, match="gen_small gave 3 distinct problems"):
        unique_set(gen_small, 4, seed=0)


def test_every_scale2_task_has_room_for_its_splits() -> None:
    """200 validation + 200 test + 400 training problems, all distinct."""
    for task in tasks.TASKS.values():
        assert len(task.in_domain.problems()) >= 800, task.name


def test_the_committed_probe_pool_is_what_the_generator_makes() -> None:
    pool = probe.load_pool()  # raises if the committed file and the generator differ
    families = {x["family"] for x in pool}
    assert len(families) >= 5 and len(pool) >= 1000
    assert len({x["question"] for x in pool}) == len(pool)
    assert all(x["scorer"] in scoring.SCORERS for x in pool)
    assert not any("+" in x["question"] for x in pool)  # addition is what scale 2 trains
    with pytest.raises(ValueError, match="answer is an operand"):
        probe._check_not_degenerate([probe._item("mul", "Calculate 7 * 1.", "7", "num")])


def test_the_retention_screen_keeps_400_items_from_5_families() -> None:
    path = Path(RESULTS) / "retention_screen.json"
    if not path.exists():
        pytest.skip("the base-model screen has not been run (screen_tasks.py)")
    saved = json.loads(path.read_text())
    pool = probe.load_pool()
    assert saved["key"]["pool"] == probe.pool_hash(pool)
    assert [r["question"] for r in saved["items"]] == [x["question"] for x in pool]
    for r, x in zip(saved["items"], probe.family_others(pool), strict=True):
        assert r["strict"] == scoring.ok(r["reply"], x)  # the scorer's verdict on the reply
    kept = [r for r in saved["items"] if r["strict"]]
    assert len(kept) >= 400 and len({r["family"] for r in kept}) >= 5


def test_scale2_cache_key_follows_the_task_and_the_retention_set() -> None:
    pytest.importorskip("peft")
    from experiments.otr_vs_sft import scale2

    cfg = dict(scale2.FULL)
    spec = tasks.TASKS["add2d"]
    ret = {"kept": "abc", "n": 400}
    key = RunCache.key(scale2.run_identity(spec, cfg, ret))
    assert key == RunCache.key(scale2.run_identity(spec, dict(cfg), dict(ret)))
    changed = [
        scale2.run_identity(tasks.TASKS["add1d"], cfg, ret),
        scale2.run_identity(
            tasks.Task("add2d", tasks.Terms("+", (10, 48), (10, 49)), spec.ood, spec.note),
            cfg,
            ret,
        ),
        scale2.run_identity(
            tasks.Task("add2d", spec.in_domain, spec.ood, spec.note, (1, 302, 303, 10_000)),
            cfg,
            ret,
        ),
        scale2.run_identity(spec, {**cfg, "n_ood": 100}, ret),
        scale2.run_identity(spec, {**cfg, "lora_r": 8}, ret),
        scale2.run_identity(spec, cfg, {**ret, "kept": "abd"}),
    ]
    assert len({RunCache.key(c) for c in changed} | {key}) == len(changed) + 1


def test_scale1_cache_keys_unchanged() -> None:
    """Every committed scale-1 run is still found under its file name (the coordinator's
    experiment reuses them)."""
    files = sorted((Path(RESULTS) / "runs" / "continuum").glob("*.json"))
    if not files:
        pytest.skip("no committed scale-1 runs")
    for f in files:
        assert RunCache.key(json.loads(f.read_text())["config"]) == f.stem, f.name


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(0)
    sft = (rng.random((3, 400)) < 0.5).astype(float)
    same = stats.paired_bootstrap(sft, sft)
    assert same["mean"] == 0 and same["lo"] == 0 and same["hi"] == 0
    assert same["verdict"] == "no difference"
    better = np.maximum(sft, (rng.random((3, 400)) < 0.3))  # +~15 points on every seed
    win = stats.paired_bootstrap(better, sft)
    assert win["verdict"] == "win" and 0 < win["lo"] < win["mean"] < win["hi"]
    assert stats.paired_bootstrap(sft, better)["verdict"] == "loss"
    noise = (rng.random((3, 400)) < 0.5).astype(float)  # another draw of the same accuracy
    wide = stats.paired_bootstrap(noise, sft)  # true difference 0: inside, ~8 points wide
    assert wide["lo"] < 0 < wide["hi"] and 0.03 < wide["hi"] - wide["lo"] < 0.25
    assert wide["verdict"] == "no difference"
    with pytest.raises(ValueError, match="equal"):
        stats.paired_bootstrap(sft, sft[:, :10])


def test_bootstrap_reads_per_item_records() -> None:
    runs = [
        {"setting": "best_lr", "method": m, "seed": s, "items": {"in_domain": bits}}
        for s in range(3)
        for m, bits in (("sft", "0011" * 50), ("dft", "1111" * 50))
    ]
    r = stats.versus_sft(runs, "best_lr", "dft", "in_domain")
    assert r["n_seeds"] == 3 and r["n_items"] == 200 and r["mean"] == pytest.approx(0.5)
    assert r["verdict"] == "win"
    assert "dft" in stats.bootstrap_table(runs, ["in_domain"])


def test_the_screen_asks_only_new_items(tmp_path: Path, monkeypatch) -> None:
    """Replies are kept; a rerun with more items generates only the new ones, and every
    verdict comes from the current scorer."""
    pytest.importorskip("peft")
    from experiments.otr_vs_sft import scale2

    asked: list[list[str]] = []

    def fake_generate(model, tok, questions, max_new, batch=64):
        asked.append(list(questions))
        return ["7 * 8 = 56" if "7 * 8" in q else "I am not sure." for q in questions]

    monkeypatch.setattr(scale2, "generate", fake_generate)
    first = [probe._item("mul", "Calculate 7 * 8.", "56", "num")]
    second = first + [probe._item("mul", "Calculate 6 * 8.", "48", "num")]
    key = {"model": "m", "max_new": 48, "pool": "x"}
    path = str(tmp_path / "screen.json")
    got = scale2.screen(None, None, first, path, key, log=lambda m: None)
    assert [r["strict"] for r in got] == [True]
    got = scale2.screen(None, None, second, path, {**key, "pool": "y"}, log=lambda m: None)
    assert asked == [["Calculate 7 * 8."], ["Calculate 6 * 8."]]
    assert [(r["strict"], r["lenient"]) for r in got] == [(True, True), (False, False)]
    scale2.screen(None, None, second, path, {**key, "max_new": 32}, log=lambda m: None)
    assert len(asked) == 3 and len(asked[-1]) == 2  # another reply length: asked again


def test_a_worked_solution_is_scored_on_its_final_answer() -> None:
    worked = tasks.WorkedSum("guided")
    target = worked.target(7, 7, 1)
    assert target.splitlines() == [
        "First, we add 7 and 7: 7 + 7 = 14.",
        "Next, we add 1: 14 + 1 = 15.",
        "So, the answer is 15.",
    ]
    assert scoring.final_ok(target, "15") and not scoring.final_ok(target, "14")
    # an intermediate result is no final answer, strictly; leniently a stated line is
    assert not scoring.final_ok("First: 7 + 7 = 14.\nThen 14 + 1 = 16.", "14")
    assert scoring.final_ok("First: 7 + 7 = 14.\nThen 14 + 1 = 16.", "14", lenient=True)
    assert not scoring.final_ok("To calculate 7 + 7 + 1, we need", "1")  # an operand, cut
    assert not scoring.final_ok("", "15")


def test_worked_items_are_distinct_refuse_and_carry_their_answer() -> None:
    pytest.importorskip("peft")
    from experiments.otr_vs_sft import scale2

    small = tasks.WorkedSum("steps", terms=(1, 2))  # 8 problems
    got = tasks.items(small, 8, seed=0)
    assert len({q for q, _ in got}) == 8
    with pytest.raises(ValueError, match="holds 8 distinct problems"):
        tasks.items(small, 9, seed=0)
    items = scale2.task_items(got)
    for (q, _), item in zip(got, items, strict=True):
        xs = [int(x) for x in q.split("Calculate ")[1].split(" step")[0].split(" + ")]
        assert item["scorer"] == "final" and item["answer"] == str(sum(xs))
        assert scoring.ok(item["target"], item)
    plain = scale2.task_items([("Calculate 3 + 4.", "3 + 4 = 7")])[0]
    assert plain["scorer"] == "num" and plain["answer"] == "7"
    assert scale2.reply_tokens(small) == scale2.WORKED_NEW
    assert scale2.reply_tokens(tasks.TASKS["add2d"].in_domain) == scale2.MAX_NEW["task"]


@pytest.mark.parametrize("task", ["add1d", "add2d"])
def test_committed_scale2_runs_are_found_under_todays_keys(task: str) -> None:
    """A committed run's file name is the key of its stored configuration, and that
    configuration's task, model, splits, reply lengths and LoRA are what the code makes
    today (a change there would silently retrain everything, or worse, reuse stale runs
    if the version were not part of the key)."""
    pytest.importorskip("peft")
    from experiments.otr_vs_sft import scale2

    folder = Path(RESULTS) / "runs" / scale2.results_name(task)
    files = sorted(folder.glob("*.json"))
    if not files:
        pytest.skip(f"no committed runs of {task}")
    today = scale2.run_identity(tasks.TASKS[task], dict(scale2.FULL), {})
    for path in files:
        config = json.loads(path.read_text())["config"]
        assert path.stem == RunCache.key(config)
        for field, value in today.items():
            if field != "retention":
                assert json.loads(json.dumps(value)) == config[field], (path.name, field)


def test_forgetting_curves_and_tradeoff_points_read_their_records(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from experiments.otr_vs_sft import views

    def run(setting, method, seed, steps, ind, ret, lr=1e-4):
        return {"setting": setting, "method": method, "seed": seed, "steps": steps,
                "lr": lr, "in_domain": ind, "ood": 0.0, "retention": ret}  # fmt: skip

    runs = [run(f"forgetting_{k}", "sft", s, k, 0.5 + k / 1000, 1 - k / 1000 - s / 100)
            for k in (100, 200) for s in (0, 1)]  # fmt: skip
    payload = {"methods": ["sft"], "runs": runs, "scale": "test",
               "base_model": {"in_domain": 0.3, "ood": 0.0, "retention": 1.0}}  # fmt: skip
    curves = views.forgetting_curves(payload)["sft"]
    assert [p[0] for p in curves["retention"]] == [0, 100, 200]
    assert curves["retention"][1][1] == pytest.approx(1 - 0.1 - 0.005)
    assert curves["in_domain"][0] == (0, 0.3, 0.0)
    path = tmp_path / "real_model_x_forgetting.json"
    path.write_text(json.dumps(payload))
    assert Path(views.plot_forgetting(str(path))).stat().st_size > 0
    trade = {**payload, "task": {"name": "x"},
             "runs": [run("tradeoff", "dft", 0, 100, 0.9, 0.7, lr=3e-4),
                      run("tradeoff", "dft", 0, 100, 0.8, 0.9, lr=1e-4)]}  # fmt: skip
    assert views.tradeoff_points(trade) == {"dft": [(1e-4, 0.8, 0.9), (3e-4, 0.9, 0.7)]}
    table = views.tradeoff_table(trade).splitlines()  # by LR, the columns every row has
    assert table[0] == "| method | LR | seed | in_domain | ood | retention |"
    assert table[2:] == ["| dft | 0.0001 | 0 | 0.800 | 0.000 | 0.900 |",
                         "| dft | 0.0003 | 0 | 0.900 | 0.000 | 0.700 |"]  # fmt: skip
    assert views.tradeoff_table(payload) is None  # no trade-off records, no table
    path = tmp_path / "real_model_x.json"
    path.write_text(json.dumps(trade))
    (tmp_path / "real_model_x_progress.json").write_text("{}")  # a report, not a payload
    written = sorted(views.plot_all(str(tmp_path)))
    assert written == [str(tmp_path / f"real_model_x_{v}.png") for v in ("forgetting", "tradeoff")]


def test_tens_and_ones_solutions_add_up() -> None:
    spec = tasks.TASKS["worked2d"]
    assert isinstance(spec.in_domain, tasks.WorkedTensOnes)
    for a, b in sorted(spec.in_domain.problems())[::37]:
        lines = spec.in_domain.target(a, b).splitlines()
        assert len(lines) == 4 and lines[-1] == f"So, the answer is {a + b}."
        for line in lines[:3]:  # every step's equation is right
            left, right = line.split(": ")[1].rstrip(".").split(" = ")
            assert sum(int(x) for x in left.split(" + ")) == int(right)
    item = {"scorer": "final", "answer": "60"}
    assert scoring.ok(spec.in_domain.target(28, 32), item)
    assert not scoring.ok("28 + 32 = 60\n\nSo, the answer is 50.", item)


# Computed with the code of commit 602d6a0 (before the worked-solution task kinds), under
# which the committed add1d runs and the earlier add2d runs were defined.
PINNED_SCALE2 = {
    "add2d": ("8460da7c5e3190a6", "58c8fd48d843c5d6"),
    "add1d": ("bc3b40c6bcf75490", "ff74f03eb167c3b6"),
}


@pytest.mark.parametrize("task", sorted(PINNED_SCALE2))
def test_scale2_identity_and_data_are_pinned(task: str) -> None:
    """The task part of every scale-2 cache key (retention aside) and the validation,
    test, OOD and training items of every seed are what they were when the cached runs
    were made: a change would silently retrain them or, worse, misread them."""
    pytest.importorskip("peft")
    import hashlib

    from experiments.otr_vs_sft import scale2

    spec = tasks.TASKS[task]
    key = RunCache.key(scale2.run_identity(spec, dict(scale2.FULL), {}))
    s_val, s_test, s_ood, s_train = spec.seeds
    val = tasks.items(spec.in_domain, 200, s_val)
    test = tasks.items(spec.in_domain, 200, s_test, exclude={q for q, _ in val})
    held = {q for q, _ in val + test}
    ood = tasks.items(spec.ood, 200, s_ood)
    train = [tasks.items(spec.in_domain, 400, s_train + s, exclude=held) for s in (0, 1, 2)]
    data = hashlib.sha1(json.dumps([val, test, ood, train]).encode()).hexdigest()[:16]
    assert (key, data) == PINNED_SCALE2[task]


def test_scale2_progress_reads_a_partial_run_cache(tmp_path: Path) -> None:
    from experiments.otr_vs_sft import scale2_progress

    def put(name, config, result):
        (tmp_path / f"{name}.json").write_text(json.dumps({"config": config, "result": result}))

    def full(method, seed, ok):
        bits = "1" * ok + "0" * (10 - ok)
        return {"in_domain": ok / 10, "ood": 0.0, "retention": ok / 10, "retention_lenient": 0.5,
                "retention_family_mean": 0.5, "retention_letter": ok / 10,
                "retention_letter_lenient": 0.5, "val_in_domain": 1.0, "val_ce": 0.1,
                "items": {"in_domain": bits, "ood": "0" * 10, "retention": bits,
                          "retention_lenient": "1" * 5 + "0" * 5}}  # fmt: skip

    put("base", {"base": True}, {"in_domain": 0.5, "items": {}})
    put("measures", {"token_measures": {"steps": 100}}, {"p_target": 0.9, "argmax_share": 0.95})
    for i, (method, lr) in enumerate([("sft", 1e-4), ("sft", 3e-4), ("dft", 3e-4)]):
        put(f"s{i}", {"method": {"name": method}, "lr": lr, "seed": 0},
            {"val_in_domain": 1.0, "val_ce": 0.1 * (i + 1)})  # fmt: skip
    for seed in (0, 1, 2):
        put(f"f{seed}", {"method": {"name": "sft"}, "lr": 3e-4, "seed": seed, "eval": "full"},
            full("sft", seed, 5))  # fmt: skip
    put("d0", {"method": {"name": "dft"}, "lr": 3e-4, "seed": 0, "eval": "full"}, full("dft", 0, 8))
    rep = scale2_progress.report(scale2_progress.cached(str(tmp_path)))
    assert rep["best_lr_runs"]["sft"]["seeds"] == [0, 1, 2]
    assert rep["best_lr_runs"]["dft"]["families"] == {"letter": 0.8}
    cmp = rep["versus_sft"]["dft"]["in_domain"]
    assert cmp["n_seeds"] == 1 and cmp["mean"] == pytest.approx(0.3)
    text = scale2_progress.markdown("x", rep)
    assert "(1 of 3 seeds)" in text and "win" not in text  # no verdict on one seed
    assert len(rep["sweep"]) == 3
    measures = {"p_target": 0.9, "argmax_share": 0.95}
    assert rep["base"] == {"in_domain": 0.5, "token_measures": measures}


def test_token_measures_do_not_depend_on_the_batching() -> None:
    """scale 1 measures in one batch, scale 2 in several: the same figures either way."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from experiments.otr_vs_sft.common import make_collate, token_measures

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n in range(3, 13):
        ids = torch.randint(1, 50, (n,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    collate = make_collate(0)
    whole = token_measures(model, [collate(examples)])
    parts = token_measures(model, (collate(examples[i : i + 3]) for i in range(0, 10, 3)))
    assert whole["tokens"] == parts["tokens"] == sum(n - 2 for n in range(3, 13))
    assert whole == parts and 0 < whole["p_target"] < 1


def test_family_mean_bootstrap_is_stratified() -> None:
    """The mean over families weighs every family alike: a gain on the largest family
    alone is a pooled win but a smaller family-mean difference, and its interval comes
    from resampling within families (every replicate keeps every family)."""
    families = ["letter"] * 300 + ["mul"] * 20 + ["div"] * 20
    rng = np.random.default_rng(1)
    sft = (rng.random((3, 340)) < 0.3).astype(float)
    better = sft.copy()
    better[:, :300] = np.maximum(better[:, :300], rng.random((3, 300)) < 0.5)  # letters only
    pooled = stats.paired_bootstrap(better, sft)
    fam = stats.paired_bootstrap(better, sft, strata=families)
    d = better - sft
    per_family = [d[:, :300].mean(), d[:, 300:320].mean(), d[:, 320:].mean()]
    assert fam["mean"] == pytest.approx(np.mean(per_family))
    assert fam["mean"] == pytest.approx(pooled["mean"] * 340 / 300 / 3)
    assert pooled["verdict"] == "win" and fam["lo"] <= fam["mean"] <= fam["hi"]
    # a loss confined to two small families: the pooled mean barely moves, the family mean does
    worse = sft.copy()
    worse[:, 300:] = 0.0
    sft_hi = sft.copy()
    sft_hi[:, 300:] = 1.0
    assert stats.paired_bootstrap(worse, sft_hi, strata=families)["verdict"] == "loss"
    one = stats.paired_bootstrap(better, sft, strata=["x"] * 340)  # one group = pooled mean
    assert one["mean"] == pytest.approx(pooled["mean"])
    with pytest.raises(ValueError, match="one label per item"):
        stats.paired_bootstrap(better, sft, strata=families[:10])
    runs = [
        {"setting": "best_lr", "method": m, "seed": s, "items": {"retention": bits}}
        for s in range(3)
        for m, bits in (("sft", "0" * 300 + "1" * 40), ("dft", "1" * 300 + "0" * 40))
    ]
    with pytest.raises(ValueError, match="group of every item"):
        stats.versus_sft(runs, "best_lr", "dft", "retention_family_mean")
    r = stats.versus_sft(runs, "best_lr", "dft", "retention_family_mean", strata=families)
    assert r["mean"] == pytest.approx((1 - 1 - 1) / 3) and r["verdict"] == "loss"
    assert stats.versus_sft(runs, "best_lr", "dft", "retention")["verdict"] == "win"
    table = stats.bootstrap_table(runs, ["retention", "retention_family_mean"], strata=families)
    assert "win" in table and "loss" in table


def test_tables_give_the_family_mean_interval_and_check_its_groups(tmp_path: Path) -> None:
    """A scale-2 payload with each retention item's family gets the stratified family-mean
    interval in its tables; groups that do not match the item records are refused."""
    from experiments.otr_vs_sft import run

    families = ["letter"] * 6 + ["mul"] * 2
    runs = []
    for seed in range(3):
        for method, bits in (("sft", "00000011"), ("dft", "11111100")):
            by: dict[str, list[bool]] = {}
            for bit, fam in zip(bits, families, strict=True):
                by.setdefault(fam, []).append(bit == "1")
            runs.append(
                {
                    "setting": "best_lr",
                    "method": method,
                    "seed": seed,
                    "lr": 1e-4,
                    "in_domain": 0.5,
                    "ood": 0.5,
                    "retention": bits.count("1") / 8,
                    "retention_family_mean": sum(sum(v) / len(v) for v in by.values()) / 2,
                    "items": {"retention": bits},
                }
            )
    payload = {
        "scale": "2: test",
        "runtime_s": 0.0,
        "base_model": {"in_domain": 0.1, "ood": 0.1, "retention": 1.0},
        "retention_item_families": families,
        "runs": runs,
    }
    run._save(str(tmp_path), "real_model_t", payload)
    text = (tmp_path / "real_model_t_tables.md").read_text()
    assert "retention_family_mean - sft" in text
    # pooled: +6 letters - 2 products of 8 = +0.5; per family +1 and -1: mean over families 0
    row = next(line for line in text.splitlines() if line.startswith("| dft | +0.500"))
    assert row.endswith("| +0.000 [+0.000, +0.000] no difference (3 x 8) |")
    with pytest.raises(AssertionError, match="retention items"):
        run._save(str(tmp_path), "bad", {**payload, "retention_item_families": families[:-1]})
    swapped = families[2:] + families[:2]  # same sizes, wrong items: the family means differ
    with pytest.raises(AssertionError):
        run._save(str(tmp_path), "bad", {**payload, "retention_item_families": swapped})


def test_a_missing_snapshot_is_retrained_and_the_retrain_is_checked(tmp_path: Path) -> None:
    """A snapshot that is on disk is read as it is; one that is gone is made again by
    retraining, and the record says whether the retrain ended where the cached run did;
    a retrain that writes no snapshot is an error, not a silent read of nothing."""
    from experiments.otr_vs_sft import scale2

    final = {"val_in_domain": 0.9, "val_ce": 0.25}
    lines: list[str] = []
    calls: list[str] = []

    def cached() -> dict:  # the cached run's record, read only when a retrain happened
        calls.append("read")
        return final

    def retrain(ends: dict, write: bool = True):
        def go() -> dict:
            calls.append("retrain")
            if write:
                (tmp_path / "step50").mkdir(exist_ok=True)
            return ends

        return go

    adapter = str(tmp_path / "step50")
    same = scale2.snapshot_or_retrain(adapter, retrain(dict(final)), cached, lines.append)
    assert same == {"matches_final": True} and calls == ["retrain", "read"]
    assert scale2.snapshot_or_retrain(adapter, retrain(final), cached, lines.append) is None
    assert calls == ["retrain", "read"]  # on disk: not retrained, nothing read
    other = str(tmp_path / "step60")
    with pytest.raises(RuntimeError, match="did not write"):
        scale2.snapshot_or_retrain(other, retrain(final, write=False), cached, lines.append)
    (tmp_path / "step50").rmdir()
    moved = {"val_in_domain": 0.9, "val_ce": 0.26}
    assert scale2.snapshot_or_retrain(adapter, retrain(moved), cached, lines.append) == {
        "matches_final": False
    }
    assert any("WARNING" in line for line in lines)


def test_two_writers_of_one_record_do_not_collide(tmp_path: Path, monkeypatch) -> None:
    """Two shards write the base record at once: a second writer that finishes between
    the first one's dump and its rename must not take the first one's file away."""
    from experiments.otr_vs_sft import common

    path = str(tmp_path / "record.json")
    real_replace, nested = common.os.replace, []

    def replace_after_another_writer(src: str, dst: str) -> None:
        if not nested:
            nested.append(True)
            common.write_json(path, {"writer": 2})
        real_replace(src, dst)

    monkeypatch.setattr(common.os, "replace", replace_after_another_writer)
    common.write_json(path, {"writer": 1})
    assert json.loads(Path(path).read_text()) == {"writer": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_scale2_progress_keeps_forgetting_runs_apart(tmp_path: Path) -> None:
    """The forgetting runs (3x the steps) share the task's cache: the usual report leaves
    them out, --forgetting reads each at every multiple of the usual steps."""
    from experiments.otr_vs_sft import scale2_progress

    def put(name, config, result):
        (tmp_path / f"{name}.json").write_text(json.dumps({"config": config, "result": result}))

    def result(ok):
        bits = "1" * ok + "0" * (10 - ok)
        return {"in_domain": ok / 10, "ood": 0.0, "retention": ok / 10, "retention_lenient": 0.5,
                "retention_family_mean": 0.5, "retention_letter": ok / 10,
                "retention_letter_lenient": 0.5,
                "items": {"in_domain": bits, "ood": "0" * 10, "retention": bits,
                          "retention_lenient": "1" * 5 + "0" * 5}}  # fmt: skip

    def run(method, seed, steps, at_step=None):
        config = {"method": {"name": method}, "lr": 3e-4, "seed": seed, "eval": "full",
                  "train": {"steps": steps}}  # fmt: skip
        if at_step is not None:
            config["at_step"] = at_step
        return config

    put("base", {"base": True}, {"in_domain": 0.5, "items": {}})
    put("sft100", run("sft", 0, 100), result(9))
    for method, ok in (("sft", 6), ("dft", 8)):
        put(f"{method}300", run(method, 0, 300), result(ok - 2))
        put(f"{method}300at100", run(method, 0, 300, 100), result(ok))
        put(f"{method}300at200", run(method, 0, 300, 200), result(ok - 1))
    put("sft300at90", run("sft", 0, 300, 90), result(1))  # not a multiple: not a read
    records = scale2_progress.cached(str(tmp_path))
    usual = scale2_progress.report(records)
    assert list(usual["best_lr_runs"]) == ["sft"]
    assert usual["best_lr_runs"]["sft"]["in_domain"] == [0.9]
    rep = scale2_progress.forgetting_report(records)
    assert rep["steps"] == [100, 200, 300]
    assert rep["runs"]["sft"]["reads"][100]["in_domain"] == [0.6]
    assert [rep["runs"]["dft"]["reads"][s]["in_domain"][0] for s in (100, 200, 300)] == [
        0.8,
        0.7,
        0.6,
    ]
    assert rep["versus_sft"]["dft"][200]["in_domain"]["mean"] == pytest.approx(0.2)
    text = scale2_progress.forgetting_markdown("x", rep)
    assert "(1 of 3 seeds)" in text and "win" not in text
