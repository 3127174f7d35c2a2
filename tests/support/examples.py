"""The repository's example scripts, loaded by file path (they are scripts, not modules)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def load_example(name: str) -> ModuleType:
    """``examples/tiny/<name>.py`` as a module."""
    path = REPO / "examples" / "tiny" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_logs(output: str) -> list[dict]:
    """The trainer's log dicts in a run's output (the demo's own reader)."""
    return load_example("summarize_run").parse_logs(output)
