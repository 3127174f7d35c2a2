"""The whole-map tables of README "When does OTR help?" (``map_summary.py``): levels
sorted by the base model's accuracy, an interval that excludes 0 in bold, methods not run
as ``-``, the family mean only where the probe has families, and the forgetting runs per
read step."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from experiments.otr_vs_sft import map_summary


def _run(method, seed, setting, in_domain, retention, **extra):
    """A record with per-item results: 20 test items, 10 probe items."""
    ones = lambda k, n: "1" * k + "0" * (n - k)  # noqa: E731
    return {"method": method, "seed": seed, "setting": setting, "lr": 1e-4,
            "in_domain": in_domain / 20, "ood": 0.0, "retention": retention / 10,
            "items": {"in_domain": ones(in_domain, 20), "ood": "0" * 20,
                      "retention": ones(retention, 10)}, **extra}  # fmt: skip


def _results(tmp_path: Path) -> Path:
    measures = {"p_target": 0.7, "argmax_share": 0.8, "tokens": 100}
    # scale 1: SFT 18/20 on every seed, pure OTR 8/20: a loss whatever the resampling
    continuum = {
        "levels": [{"level": 0, "base": {"in_domain": 0.6}, "token_measures": measures}],
        "runs": [_run(m, s, "best_lr", k, 5, level=0)
                 for s in range(3) for m, k in (("sft", 18), ("otr_sampled", 8))],
    }  # fmt: skip
    families = ["a"] * 5 + ["b"] * 5
    real = {
        "base_model": {"in_domain": 0.3, "ood": 0.1, "token_measures": measures},
        "retention_item_families": families,
        "runs": [_run(m, s, "best_lr", 10, 5) for s in range(3) for m in ("sft", "dft")],
    }
    forgetting = {
        "scale": "2: test", "methods": ["sft", "dft"], "best_lr": {"sft": 1e-5, "dft": 1e-4},
        "base_model": real["base_model"], "retention_item_families": families,
        "runs": [_run(m, s, f"forgetting_{step}", 10, 9 if m == "sft" else 2)
                 for step in (100, 200) for s in range(3) for m in ("sft", "dft")],
    }  # fmt: skip
    for name, payload in (("continuum", continuum), ("real_model_t", real),
                          ("real_model_t_forgetting", forgetting)):  # fmt: skip
        (tmp_path / f"{name}.json").write_text(json.dumps(payload))
    return tmp_path


def test_the_summary_sorts_levels_marks_verdicts_and_reads_forgetting(tmp_path: Path) -> None:
    text = map_summary.summary(str(_results(tmp_path)))
    glance = text.split("### At a glance")[1].split("###")[0]
    assert "| scale 1 level 0: 0.600 (0.700) | 1e-4, 1e-4, - | 0.900 | **-0.500" in glance
    in_domain = text.split("### in-domain")[1].split("###")[0]
    rows = [line for line in in_domain.splitlines() if line.startswith("| scale")]
    assert [r.split(":")[0] for r in rows] == ["| scale 2 t", "| scale 1 level 0"]  # by base
    scale2, scale1 = rows
    loss = r"\*\*-0\.{} \[-[01]\.\d{{3}}, -0\.\d{{3}}\]\*\*"  # bold: the interval excludes 0
    assert re.search(r"\| 0\.900 \| - \| " + loss.format(500) + r" \| - \| - \|$", scale1)
    assert "| 0.500 | +0.000 [+0.000, +0.000] | - | - | - |" in scale2  # no difference
    family = text.split("### retention, mean over families")[1].split("##")[0]
    assert "scale 2 t" in family and "scale 1" not in family  # only where there are families
    forgetting = text.split("## Forgetting under pressure: `real_model_t_forgetting`")[1]
    assert "seeds [0, 1, 2]" in forgetting and "sft 1e-05, dft 0.0001" in forgetting
    pooled = forgetting.split("### retention, pooled")[1].split("###")[0]
    for step in (100, 200):
        assert re.search(rf"\| {step} \| 0\.900 \| " + loss.format(700) + r" \|", pooled)


def test_the_committed_summary_and_the_readmes_table_are_what_the_results_give() -> None:
    """``--check`` on the committed results: results/otr_map_summary.md and the README's
    copy of the at-a-glance table are what map_summary writes."""
    assert map_summary.main(["--check"]) == 0


def test_the_generator_rewrites_the_readmes_one_table_and_check_writes_nothing(
    tmp_path: Path, capsys
) -> None:
    results = _results(tmp_path)
    readme = tmp_path / "README.md"
    stale = "| scale 1 level 0: 0.600 (0.700) | hand-edited |"
    header = map_summary.glance_table([])[0]
    readme.write_text(f"# Title\n\ntext before\n\n{header}\n|---|\n{stale}\n\ntext after\n")
    before = readme.read_text()
    assert map_summary.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1
    assert "is stale" in capsys.readouterr().out
    assert readme.read_text() == before and not (results / map_summary.OUT_NAME).exists()
    assert map_summary.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    rows = map_summary.glance_table(map_summary.level_rows(str(results)))
    assert "text before\n\n" + "\n".join(rows) + "\n\ntext after\n" in text and stale not in text
    assert map_summary.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0
    readme.write_text(text + "\n" + "\n".join(rows) + "\n")  # a second copy: which one?
    with pytest.raises(ValueError, match="found 2"):
        map_summary.main(["--results", str(results), "--readme", str(readme)])
