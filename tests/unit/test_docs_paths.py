"""Every repository path the docs name exists: a file moved without its readers fails here
(README.md, docs/, examples/configs/README.md, bench/README.md, the study's README)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    REPO / "examples" / "configs" / "README.md",
    REPO / "bench" / "README.md",
    REPO / "experiments" / "otr_vs_sft" / "README.md",
]
# A path in backticks or a link that starts at one of this repository's folders (Axolotl's
# own examples/<model>/ paths, named as sources, are not ours).
TOP = ("axolotl_otr", "tests", "bench", "experiments", "docs", "scripts", ".ci")
TOP += ("examples/configs", "examples/smollm2", "examples/tiny")
MADE_BY_A_COMMAND = {"bench/results/gpu/"}  # `make gpu-check` writes it
FOLDERS = "|".join(map(re.escape, TOP))
PATH = re.compile(r"(?:`|\]\()((?:" + FOLDERS + r")/[\w./-]+?)(?:[`):#]|\s)")


def named_paths(doc: Path) -> list[str]:
    text = doc.read_text()
    return sorted({m.group(1).rstrip(".") for m in PATH.finditer(text) if "*" not in m.group(1)})


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_path_a_doc_names_exists(doc):
    missing = [
        p for p in named_paths(doc) if p not in MADE_BY_A_COMMAND and not (REPO / p).exists()
    ]
    assert not missing, f"{doc.relative_to(REPO)} names paths that do not exist: {missing}"
