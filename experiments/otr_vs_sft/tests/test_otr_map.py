"""The map generator (``experiments/otr_vs_sft/otr_map.py``): measured levels placed and
sorted, unmeasured ones skipped, and ``--check`` telling a stale packaged map from a fresh
one. The packaged copy's equality check stays in ``make test``
(``tests/unit/test_map_reading.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from axolotl_otr.map_reading import read_map
from experiments.otr_vs_sft import otr_map as generator_module


def _generator():
    return generator_module


def test_the_generator_places_measured_levels_and_skips_the_others(tmp_path):
    generator = _generator()
    otr_map = generator.derive(str(_results(tmp_path, measured=True)))
    assert [s["name"] for s in otr_map["skipped"]] == ["scale 1 level 0 (base in-domain 0.10)"]
    assert [lv["p_target"] for lv in otr_map["levels"]] == [0.55, 0.9]  # sorted by p
    scale1, scale2 = otr_map["levels"]
    assert scale1["source"] == "experiments/otr_vs_sft/results/continuum.json"
    assert scale1["sft_in_domain"] == pytest.approx(0.85)
    diff = scale1["differences"]["otr_sampled"]
    assert diff["mean"] == pytest.approx((0.05 - 0.04) / 2) and diff["n_seeds"] == 2
    assert diff["std"] == pytest.approx(math.sqrt(2 * 0.045**2), abs=1e-4)
    assert scale2["name"].startswith("scale 2 real_model_add1d")
    assert scale2["differences"]["otr_sampled"]["mean"] == pytest.approx(0.05)
    assert "scale 1" in otr_map["scope"] and "scale 2" in otr_map["scope"]
    line = read_map(0.7, 0.8, otr_map)
    assert "between the measured levels scale 1 level 1" in line and "real_model_add1d" in line


def test_the_generator_with_no_measured_level_gives_an_empty_readable_map(tmp_path):
    generator = _generator()
    results = _results(tmp_path, measured=False)
    (results / "real_model_add1d.json").unlink()
    otr_map = generator.derive(str(results))
    assert otr_map["levels"] == [] and len(otr_map["skipped"]) == 2
    assert "no measured level to compare with" in read_map(0.5, 0.5, otr_map)


def test_the_generators_check_mode_tells_stale_from_fresh(tmp_path, capsys):
    generator = _generator()
    assert generator.main(["--check"]) == 0
    results = _results(tmp_path, measured=True)  # results whose map is not the shipped one
    assert generator.main(["--results", str(results), "--check"]) == 1
    assert "differs from what" in capsys.readouterr().out
    assert not (results / "otr_map.json").exists()  # --check writes nothing


def _results(tmp_path: Path, measured: bool) -> Path:
    def runs(level, sft, otr):
        out = []
        for seed, (a, b) in enumerate(zip(sft, otr, strict=True)):
            for method, acc in (("sft", a), ("otr_sampled", b)):
                out.append(
                    {"level": level, "method": method, "seed": seed, "setting": "best_lr",
                     "in_domain": acc}
                )  # fmt: skip
        return out

    levels = [
        {"level": 0, "base": {"in_domain": 0.1}},
        {"level": 1, "base": {"in_domain": 0.6}},
    ]
    if measured:
        levels[1]["token_measures"] = {"p_target": 0.55, "argmax_share": 0.65, "tokens": 900}
    continuum = {
        "levels": levels,
        "runs": runs(0, [0.5, 0.6], [0.4, 0.4]) + runs(1, [0.8, 0.9], [0.85, 0.86]),
    }
    real = {
        "base_model": {"in_domain": 0.8, "token_measures": {"p_target": 0.9, "argmax_share": 0.93}},
        "runs": [{k: v for k, v in r.items() if k != "level"} for r in runs(0, [0.9], [0.95])],
    }
    (tmp_path / "continuum.json").write_text(json.dumps(continuum))
    (tmp_path / "real_model_add1d.json").write_text(json.dumps(real))
    return tmp_path
