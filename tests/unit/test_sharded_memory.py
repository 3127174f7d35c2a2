"""The sharded rows of the memory ledger (bench/sharded_memory.py, issue 34 item 4): the
loss's peak on the logits path and on the hidden-state path with a whole gathered head,
measured on CPU at a reduced shape from the allocator's events, is the ledger's within
5%, and docs/performance.md's table is the one the ledger makes (not a stale copy)."""

from __future__ import annotations

import pytest

from bench import sharded_memory
from tests.support.examples import REPO


@pytest.mark.parametrize("path", sharded_memory.PATHS)
def test_the_measured_peak_is_the_ledgers(path):
    shape, rows = sharded_memory.CHECK_SHAPE, sharded_memory.CHECK_ROWS
    expected = sharded_memory.total(sharded_memory.sharded_ledger(**shape, rows=rows)[path])
    measured = sharded_memory.measure(path, **shape, rows=rows)
    assert measured == pytest.approx(expected, rel=0.05), (path, measured, expected)


def test_the_docs_table_is_the_ledgers():
    text = (REPO / "docs" / "performance.md").read_text()
    section = text.split("## Sharded engines", 1)[1].split("\n## ", 1)[0]
    assert sharded_memory.table() in section
