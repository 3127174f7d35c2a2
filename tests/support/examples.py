"""The repository root, and the trainer-log reader of the examples (``examples.tiny``, a
package like every example, so the tests import it as the demos do)."""

from __future__ import annotations

from pathlib import Path

from examples.tiny import summarize_run

REPO = Path(__file__).resolve().parents[2]


def parse_logs(output: str) -> list[dict]:
    """The trainer's log dicts in a run's output (the demo's own reader)."""
    return summarize_run.parse_logs(output)
