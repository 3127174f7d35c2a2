"""The README's "Use it in your own Axolotl", done as a user does it.

In an environment that already has Axolotl: build the wheel from this source tree, install
it with pip (and, separately, from a git URL), then, from a working directory outside the
repository and with nothing of the source tree on the path, run `axolotl train` on the
tiny config with `plugins: [axolotl_otr]` and `otr: true`.

The test changes the environment it runs in (pip uninstall and install of axolotl-otr),
so it runs only where that environment is a throwaway test venv: `make test-ax021` (CI)
sets OTR_USER_INSTALL_TEST=1 for the Axolotl 0.21 venv. It always leaves the wheel built
from this tree installed, as `make setup` and `.ci/setup-axolotl-0.21.sh` do.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from tests.support.axolotl_cli import OFFLINE_ENV, REPO, parse_logs

pytestmark = [
    pytest.mark.integration,
    pytest.mark.xdist_group("test_install"),  # one worker: the module fixture once (Makefile)
    pytest.mark.skipif(
        os.environ.get("OTR_USER_INSTALL_TEST") != "1",
        reason="changes the venv it runs in: run through `make test-ax021` (CI does)",
    ),
]

BIN = Path(sys.executable).parent


def _user_env() -> dict[str, str]:
    """The user's shell: the venv's bin first, offline, and no PYTHONPATH into this tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **OFFLINE_ENV, "PATH": str(BIN) + os.pathsep + env.get("PATH", "")}


def _run(args: list[str], cwd: Path, timeout: int = 600, stdout_only: bool = False) -> str:
    """Run a command as the user would; its output (stdout alone: a printed value, not
    the warnings libraries write to stderr at import)."""
    proc = subprocess.run(
        args, cwd=cwd, env=_user_env(), capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output[-6000:]}"
    return proc.stdout if stdout_only else output


def _pip(*args: str, cwd: Path) -> str:
    return _run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], cwd)


def _where_it_imports_from(cwd: Path) -> Path:
    code = "import axolotl_otr, pathlib; print(pathlib.Path(axolotl_otr.__file__).resolve())"
    return Path(_run([sys.executable, "-c", code], cwd, stdout_only=True).strip())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from this tree the way a user builds one (`pip wheel`)."""
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "-q", "-w", str(dist), str(REPO), cwd=dist)
    (built,) = dist.glob("axolotl_otr-*.whl")
    yield built
    _pip("install", "-q", "--no-deps", "--force-reinstall", str(built), cwd=dist)


def test_a_wheel_installed_into_an_axolotl_env_trains_from_outside_the_tree(
    wheel, tiny_dir, tmp_path
):
    work = tmp_path / "my-project"  # the user's own folder, not this repository
    work.mkdir()
    _pip("uninstall", "-y", "-q", "axolotl-otr", cwd=work)
    _pip("install", "-q", str(wheel), cwd=work)  # the dependencies are already there
    where = _where_it_imports_from(work)
    assert where.parent != REPO / "axolotl_otr" and "site-packages" in where.parts, where

    cfg = yaml.safe_load((REPO / "examples" / "configs" / "tiny-cpu-lora.yml").read_text())
    cfg.update(
        plugins=["axolotl_otr"],  # the README's two lines
        otr=True,
        base_model=str(tiny_dir / "model"),
        dataset_prepared_path="prepared",
        output_dir="out",
        max_steps=3,
        micro_batch_size=2,
        gradient_accumulation_steps=1,
    )
    cfg["datasets"][0]["path"] = str(tiny_dir / "data" / "train.jsonl")
    (work / "otr.yml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    output = _run([str(BIN / "axolotl"), "train", "otr.yml"], cwd=work)

    steps = [log for log in parse_logs(output) if "loss" in log]
    assert len(steps) == 3, output[-4000:]
    assert all("otr/ce" in log and "otr/p_target" in log for log in steps), steps
    assert "OTR on (" in output and output.count("OTR map: your p(target) ") == 1
    assert (work / "out" / "adapter_model.safetensors").stat().st_size > 0


def test_a_git_url_install_imports_from_outside_the_tree(wheel, tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("this source tree is not a git checkout")
    _pip("uninstall", "-y", "-q", "axolotl-otr", cwd=tmp_path)
    _pip("install", "-q", "--no-deps", f"git+file://{REPO}", cwd=tmp_path)
    where = _where_it_imports_from(tmp_path)
    assert where.parent != REPO / "axolotl_otr" and "site-packages" in where.parts, where
    # The plugin class Axolotl loads from `plugins: [axolotl_otr]`.
    code = "import axolotl_otr; print(axolotl_otr.OTRPlugin.__name__)"
    assert _run([sys.executable, "-c", code], tmp_path, stdout_only=True).strip() == "OTRPlugin"


@pytest.mark.integration
def test_editable_install_accepts_the_short_name(tmp_path):
    # A throwaway venv that sees this venv's packages (Axolotl, torch) through a path
    # line, so only this package is installed, editable, into it.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    target = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(target, "zz_shared_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    proc = subprocess.run([*pip, "--no-deps", "-e", str(REPO)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = (
        "import axolotl_otr, axolotl.integrations.base as b\n"
        "m = b.PluginManager.get_instance()\n"
        "m.register('axolotl_otr')\n"
        "print(axolotl_otr.__file__)\n"
        "print([type(p).__name__ for p in m.plugins.values()])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    where, plugins = out.stdout.strip().splitlines()[-2:]
    assert where.startswith(str(REPO)), where  # the checkout itself, not a copy
    # Axolotl 0.21 also registers its own built-in plugins (context and expert parallel):
    # ours must be there exactly once, whatever else is.
    assert ast.literal_eval(plugins).count("OTRPlugin") == 1, plugins
