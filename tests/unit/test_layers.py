"""The package's layers (docs/design.md): no module imports a layer below its own, and the
pure layers import neither transformers nor Axolotl."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "axolotl_otr"
# Top to bottom, as docs/design.md lists them; a module may import its own layer or above.
LAYERS = [
    {"objective"},
    {"kernels"},
    {"loss", "scaling", "metrics"},
    {"map_reading"},
    {"model"},
    {"trainer"},
    {"args", "plugin"},
]
PURE = {"objective", "kernels", "loss", "scaling", "metrics", "map_reading"}


def layer_of(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


def modules() -> list[Path]:
    return sorted(
        p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE
    )


def imported(path: Path) -> list[str]:
    """Absolute names of what ``path`` imports (relative imports resolved)."""
    package = [*path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            stem = ".".join([*base, node.module] if node.module else base)
            names += [stem] + [f"{stem}.{alias.name}" for alias in node.names]
    return names


def top(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_layer_below_its_own(path):
    own = layer_of(top(path))
    for name in imported(path):
        parts = name.split(".")
        if parts[0] != "axolotl_otr" or len(parts) < 2 or parts[1] not in set().union(*LAYERS):
            continue
        assert layer_of(parts[1]) <= own, f"{path.name} imports {name}"


@pytest.mark.parametrize(
    "path", [p for p in modules() if top(p) in PURE], ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_the_pure_layers_import_neither_transformers_nor_axolotl(path):
    for name in imported(path):
        assert name.split(".")[0] not in {"transformers", "axolotl", "peft", "accelerate"}, name


def test_every_module_is_in_a_layer():
    for path in modules():
        layer_of(top(path))


def test_every_module_has_a_test_file_named_after_it():
    tests = {p.name for p in (PACKAGE.parent / "tests").rglob("test_*.py")}
    missing = [
        str(p.relative_to(PACKAGE))
        for p in modules()
        if p.name != "__init__.py" and f"test_{p.stem}.py" not in tests
    ]
    assert not missing


# This repository's importable top-level packages; a bare `test_*` module name is a test
# file imported as a module, which only works from an old layout's sys.path.
OWN_PACKAGES = {"axolotl_otr", "tests", "bench", "examples", "experiments"}


def _own_imports(path: Path):
    """(line, module, names) of every absolute import of this repository's code in
    ``path``, inside functions too (those run only when their test runs)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [alias.name for alias in node.names if alias.name != "*"]
            yield node.lineno, node.module, names
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []


def test_every_import_of_this_repository_in_the_tests_resolves():
    """A test that cannot run here (tests/gpu/: no CUDA) still imports what exists: the
    GPU tests imported three helpers from `test_memory`, a module renamed in issue 33."""
    import importlib

    repo = PACKAGE.parent
    files = sorted(repo.glob("tests/**/*.py")) + sorted(repo.glob("experiments/**/tests/*.py"))
    problems = []
    for path in files:
        for line, module, names in _own_imports(path):
            top = module.split(".")[0]
            if top not in OWN_PACKAGES and not top.startswith("test_"):
                continue
            where = f"{path.relative_to(repo)}:{line}"
            try:
                imported_module = importlib.import_module(module)
            except ImportError as err:
                problems.append(f"{where}: {err}")
                continue
            for name in names:
                if not hasattr(imported_module, name):
                    try:
                        importlib.import_module(f"{module}.{name}")
                    except ImportError:
                        problems.append(f"{where}: {module} has no {name}")
    assert not problems, "\n".join(problems)
