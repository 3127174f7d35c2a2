"""The map of measured levels, read from the user's side (``axolotl_otr/map_reading.py``),
and its source (``experiments/otr_vs_sft/otr_map.py``): the packaged copy is what the
committed results give, levels without token measures are skipped, and the line places
a run below, between, at or above the levels with the recommendation the map's numbers
make."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from axolotl_otr import map_reading
from axolotl_otr.map_reading import load_map, read_map, verdict

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    from experiments.otr_vs_sft import otr_map

    return otr_map


def _diff(mean, lo=None, hi=None):
    out = {"mean": mean, "std": 0.01, "n_seeds": 3}
    if lo is not None:
        out.update(lo=lo, hi=hi)
    return out


METHODS = {"otr_sampled": "pure OTR", "otr_mix0.3": "OTR + 0.3 CE"}


@pytest.fixture
def synthetic_map() -> dict:
    """Three levels: SFT better at the weak end, no difference in the middle, OTR ahead at
    the strong end."""
    return {
        "source": "experiments/otr_vs_sft/results/otr_map.json",
        "methods": METHODS,
        "levels": [
            {
                "name": "weak",
                "p_target": 0.30,
                "argmax_share": 0.40,
                "differences": {
                    "otr_sampled": _diff(-0.12, -0.15, -0.09),
                    "otr_mix0.3": _diff(-0.05, -0.08, -0.02),
                    "dft": _diff(-0.13, -0.16, -0.10),
                },
            },
            {
                "name": "strong",
                "p_target": 0.90,
                "argmax_share": 0.95,
                "differences": {
                    "otr_sampled": _diff(0.04, 0.01, 0.07),
                    "otr_mix0.3": _diff(0.01, -0.01, 0.03),
                },
            },
            {
                "name": "middle",
                "p_target": 0.60,
                "argmax_share": 0.70,
                "differences": {
                    "otr_sampled": _diff(-0.01, -0.03, 0.02),
                    "otr_mix0.3": _diff(0.00, -0.02, 0.02),
                },
            },
        ],
        "skipped": [],
    }


def test_verdicts_follow_the_interval():
    assert verdict(_diff(0.02, 0.001, 0.04)) == "helped"
    assert verdict(_diff(-0.02, -0.04, -0.001)) == "worse"
    assert verdict(_diff(0.02, -0.001, 0.04)) == "no difference"
    assert verdict(_diff(0.05)) == "not tested"  # a mean without interval decides nothing


def test_below_the_lowest_level_reads_that_level(synthetic_map):
    line = read_map(0.10, 0.20, synthetic_map, tokens=500)
    assert line.startswith("OTR map: your base model gives the targets mean p 0.10 (argmax 20%")
    assert "500 target tokens" in line
    assert "below the lowest measured level weak (p 0.30, argmax 40%" in line
    assert "pure OTR - SFT -0.120 [-0.150, -0.090]" in line
    assert "dft" not in line  # only the methods the map names are read
    assert "SFT was better there: the map recommends SFT" in line
    assert "source: experiments/otr_vs_sft/results/otr_map.json" in line


def test_above_the_highest_level_reads_that_level(synthetic_map):
    line = read_map(0.97, 0.99, synthetic_map)
    assert "above the highest measured level strong (p 0.90" in line
    assert "OTR helped there (pure OTR): the map recommends pure OTR" in line


def test_between_two_levels_reads_both(synthetic_map):
    line = read_map(0.45, 0.55, synthetic_map)
    assert "between the measured levels weak (p 0.30" in line and " and middle (p 0.60" in line
    # weak says SFT, middle says no difference: no single recommendation
    assert "the two levels disagree" in line and "no single recommendation" in line
    line = read_map(0.75, 0.80, synthetic_map)
    assert "between the measured levels middle" in line and "strong" in line
    assert "the two levels disagree" in line


def test_at_a_level_and_agreeing_neighbours(synthetic_map):
    line = read_map(0.60, 0.70, synthetic_map)
    assert "at the measured level middle" in line and "weak" not in line
    assert "no measured difference between SFT and pure OTR and OTR + 0.3 CE there" in line
    synthetic_map["levels"][2]["differences"] = copy.deepcopy(
        synthetic_map["levels"][0]["differences"]
    )
    line = read_map(0.45, 0.55, synthetic_map)  # both neighbours now say SFT
    assert "disagree" not in line
    assert line.count("SFT was better there: the map recommends SFT") == 1


def test_the_recommendation_follows_the_numbers(synthetic_map):
    synthetic_map["levels"][0]["differences"]["otr_mix0.3"] = _diff(0.03, 0.01, 0.05)
    line = read_map(0.10, 0.20, synthetic_map)
    assert "OTR helped there (OTR + 0.3 CE): the map recommends OTR + 0.3 CE" in line
    synthetic_map["levels"][0]["differences"]["otr_mix0.3"] = _diff(-0.01, -0.03, 0.01)
    line = read_map(0.10, 0.20, synthetic_map)
    assert "no measured difference between SFT and OTR + 0.3 CE there" in line
    assert "SFT was better than pure OTR" in line
    synthetic_map["methods"] = {"otr_mix0.3": "the mix"}
    assert "no measured difference between SFT and the mix there" in read_map(
        0.10, 0.20, synthetic_map
    )


def test_levels_without_intervals_give_no_recommendation(synthetic_map):
    for level in synthetic_map["levels"]:
        level["differences"] = {m: _diff(0.05) for m in level["differences"]}
    line = read_map(0.10, 0.20, synthetic_map)
    assert "pure OTR - SFT +0.050 ± 0.010 std (no interval)" in line
    assert "no interval measured there: the map makes no recommendation" in line


def test_a_map_without_levels_says_so():
    empty = {"methods": METHODS, "levels": [], "skipped": [{"name": "x"}, {"name": "y"}]}
    line = read_map(0.62, 0.71, empty)
    assert "no measured level to compare with (2 measured levels have no token measures" in line
    assert "nothing to place" in read_map(float("nan"), float("nan"), empty)


@pytest.mark.parametrize(
    "broken",
    [
        [],
        {"methods": METHODS},
        {"methods": METHODS, "levels": [{"p_target": 0.5, "argmax_share": 0.5}]},
        {"methods": METHODS, "levels": [{"p_target": 1.5, "argmax_share": 0.5, "differences": {}}]},
        {"methods": METHODS, "levels": [{"p_target": "a", "argmax_share": 0.5, "differences": {}}]},
    ],
)
def test_a_malformed_map_is_a_clear_error(broken):
    with pytest.raises(ValueError, match="OTR map"):
        read_map(0.5, 0.5, broken)


def test_the_packaged_map_is_what_the_committed_results_give():
    generator = _generator()
    text = generator.dumps(generator.derive())
    assert (Path(generator.RESULTS) / "otr_map.json").read_text() == text
    assert (ROOT / "axolotl_otr" / map_reading.MAP_FILE).read_text() == text
    assert load_map() == json.loads(text)
    # the shipped map is readable whatever it holds
    assert read_map(0.5, 0.6, load_map()).startswith("OTR map: your base model")


def test_the_readme_section_the_line_names_holds_the_table_the_results_give():
    """The map line sends users to the README's "When does OTR help?" (``READ_MORE``). Its
    at-a-glance table is generated from the committed results by the study's map_summary
    (run ``python -m experiments.otr_vs_sft.map_summary`` after a result changes); a copy
    edited by hand, here or in docs/, fails."""
    from experiments.otr_vs_sft import map_summary

    table = map_summary.glance_table(map_summary.level_rows(map_summary.otr_map.RESULTS))
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## When does OTR help?\n", 1)[1].split("\n## ", 1)[0]
    assert "When does OTR help?" in map_reading.READ_MORE
    assert [section.splitlines()[a:b] for a, b in map_summary.glance_copies(section)] == [table]
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        lines = path.read_text().splitlines()
        for start, end in map_summary.glance_copies(path.read_text()):
            assert lines[start:end] == table, f"{path.name}: run map_summary"


@pytest.mark.integration
def test_the_wheel_carries_the_map(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("axolotl_otr-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read(f"axolotl_otr/{map_reading.MAP_FILE}").decode()
    assert shipped == (ROOT / "axolotl_otr" / map_reading.MAP_FILE).read_text()


def test_small_values_are_not_printed_as_zero(synthetic_map):
    line = read_map(0.001914, 0.004, synthetic_map)
    assert "mean p 0.0019 (argmax 0.40%" in line


# ---- the one line printed at the first step -------------------------------------------
def test_the_line_on_the_demos_figures_names_the_nearest_level_and_both_verdicts():
    """The demo's first step measured p(target) 0.73, argmax 80% (issue 27)."""
    line = map_reading.map_line(0.73, 0.80, load_map())
    assert len(line) <= map_reading.MAX_LINE
    assert line.startswith("OTR map: your p(target) 0.73, argmax 80%; nearest level p 0.74:")
    assert "pure OTR no gain over SFT" in line and "otr_sft_mix 0.3 no gain over SFT" in line
    assert "When does OTR help?" in line


@pytest.mark.parametrize(
    ("p", "share", "where", "level_p", "pure", "mix"),
    [
        (0.0, 0.0, "below the map; nearest level p 0.30 (0.30 away)", 0.30, "worse", "worse"),
        (0.30, 0.40, "; nearest level p 0.30:", 0.30, "worse", "worse"),
        (0.58, 0.70, "; nearest level p 0.60:", 0.60, "no gain", "no gain"),
        (0.76, 0.99, "; nearest level p 0.90 (0.14 away)", 0.90, "helped", "no gain"),
        (1.0, 1.0, "above the map; nearest level p 0.90:", 0.90, "helped", "no gain"),
    ],
)
def test_the_line_at_and_beyond_both_ends(synthetic_map, p, share, where, level_p, pure, mix):
    line = map_reading.map_line(p, share, synthetic_map)
    assert len(line) <= map_reading.MAX_LINE, line
    assert where in line, line
    assert f"pure OTR {pure}" in line and f"otr_sft_mix 0.3 {mix}" in line, line


def test_the_line_breaks_a_tie_in_p_by_the_argmax_share(synthetic_map):
    twin = copy.deepcopy(synthetic_map)
    twin["levels"].append({**twin["levels"][1], "name": "strong twin", "argmax_share": 0.5})
    twin["levels"][-1]["differences"] = {"otr_sampled": _diff(-0.1, -0.2, -0.05)}
    assert "pure OTR helped" in map_reading.map_line(0.90, 0.94, twin)
    assert "pure OTR worse than SFT" in map_reading.map_line(0.90, 0.52, twin)


def test_the_line_without_a_measure_or_a_level():
    assert "nothing to place" in map_reading.map_line(float("nan"), 0.5, load_map())
    empty = {"methods": METHODS, "levels": []}
    assert "no measured level" in map_reading.map_line(0.5, 0.5, empty)


def test_the_line_without_an_argmax_share_leaves_it_out(synthetic_map):
    line = map_reading.map_line(0.58, float("nan"), synthetic_map)
    assert "nan" not in line and line.startswith("OTR map: your p(target) 0.58; nearest level")
