"""The built wheel works on its own: recipes ship as package data, nothing is read from the source tree.

A clean virtual environment gets k2cli from the wheel (pip install, no source checkout on its path)
and borrows only the third-party dependencies (torch, datasets, ...) from the test's own environment
through a .pth line, so the test needs no network and no second torch install. It then runs, from a
directory with no recipes/ in it: `k2 --help`, `k2 data synth --preset micro`, `k2 rephrase --preset micro`
and a micro pretrain.
"""

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    try:
        import setuptools  # noqa: F401  (the build backend, used without build isolation: no network)
    except ImportError:
        pytest.skip("setuptools is not installed")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)])
    (path,) = out.glob("k2cli-*.whl")
    return path


def test_wheel_ships_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.split("builtin_recipes/", 1)[1] for n in names if "/builtin_recipes/" in n and n.endswith(".toml")}
    in_repo = {str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").glob("*/*.toml")}
    assert in_repo and shipped == in_repo


def test_installed_wheel_runs_the_micro_chain_start(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)])
    # Dependencies only: this environment's site-packages, appended after the venv's own (so the
    # wheel's k2cli wins; the editable install's .pth there is not processed from a .pth line).
    purelib = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "k2-test-deps.pth").write_text("\n".join(deps) + "\n")

    work = tmp_path / "elsewhere"  # no recipes/ here, no source tree on the path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "K2_RECIPES", "K2_STAGES")}
    env.update(K2_ARTIFACTS=str(work / "artifacts"), K2_QUIET="1")
    where = _run([str(py), "-c", "import k2cli; print(k2cli.__file__)"], cwd=work, env=env).stdout.strip()
    assert where.startswith(purelib), where  # the wheel's copy, not the checkout

    k2 = str(venv / "bin" / "k2")
    assert "pretrain" in _run([k2, "--help"], cwd=work, env=env).stdout
    _run([k2, "data", "synth", "--preset", "micro"], cwd=work, env=env)
    _run([k2, "rephrase", "--preset", "micro"], cwd=work, env=env)
    _run([k2, "pretrain", "--preset", "micro", "--set", "train.steps=2"], cwd=work, env=env)
    assert (work / "artifacts" / "pretrain" / "latest" / "manifest.json").is_file()
