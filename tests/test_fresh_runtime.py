"""The setup cell works in a fresh runtime that has only what Colab gives us.

`make test` first creates .venv-colab (torch, numpy, matplotlib, scipy,
ipykernel) and a wheelhouse with cfmlib's other dependencies in .cache/wheels
(see the Makefile). Here, without the network, the preface runs end to end in
that runtime under nbval: its setup cell installs cfmlib from this checkout,
its checked cells must print what is stored, and torch must be left exactly
as it was. This is the one place where `make test` executes the preface.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB = ROOT / ".venv-colab"
PYTHON = COLAB / "bin" / "python"
WHEELHOUSE = ROOT / ".cache" / "wheels"
PREFACE = ROOT / "chapters" / "00_preface.ipynb"

pytestmark = pytest.mark.skipif(
    not (COLAB / ".stamp").exists(), reason="no .venv-colab: run `make colab-venv` (done by `make test`)"
)

TORCH_INFO = "import torch, pathlib; print(torch.__version__, pathlib.Path(torch.__file__).stat().st_mtime_ns)"


def offline_pip_env(monkeypatch):
    """pip may install only from the local wheelhouse, with no config of this machine."""
    for name in list(os.environ):
        if name.startswith("PIP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(WHEELHOUSE))
    monkeypatch.setenv("PIP_DISABLE_PIP_VERSION_CHECK", "1")


def run(*args):
    # From a neutral folder: `python -c` puts the current folder first on sys.path, and the
    # checkout's own cfmlib/ must not shadow what pip installed into .venv-colab.
    return subprocess.run(args, check=True, capture_output=True, text=True, cwd="/").stdout.strip()


def test_setup_cell_installs_cfmlib_and_leaves_torch_alone(monkeypatch, tmp_path):
    offline_pip_env(monkeypatch)
    run(str(PYTHON), "-m", "pip", "uninstall", "--yes", "--quiet", "cfmlib")
    torch_before = run(str(PYTHON), "-c", TORCH_INFO)

    # cfmlib is installed from a copy of this checkout, as Colab would from git.
    source = tmp_path / "cfmlib-source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "setup.py", "MANIFEST.in"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "cfmlib", source / "cfmlib", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    monkeypatch.setenv("CFMLIB_SOURCE", source.as_uri())

    # A kernel running in .venv-colab.
    kernel = tmp_path / "jupyter" / "kernels" / "colab"
    kernel.mkdir(parents=True)
    argv = [str(PYTHON), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernel / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "colab", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    # nbval executes the preface in that kernel and compares its checked cells with the stored
    # outputs. This is the preface's only execution in `make test` (the main nbval run skips it).
    env = dict(os.environ)
    checked = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
         "--nbval-kernel-name", "colab", "--nbval-cell-timeout", "1800",
         "--nbval-sanitize-with", str(ROOT / "tests" / "nbval_sanitize.cfg"), str(PREFACE)],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]

    nb = nbformat.read(PREFACE, as_version=4)
    setup_output = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert setup_output.startswith("cfmlib"), setup_output
    assert run(str(PYTHON), "-c", "import cfmlib; print(cfmlib.__file__)").startswith(str(COLAB))
    assert run(str(PYTHON), "-c", TORCH_INFO) == torch_before, "pip reinstalled torch"
    # pip built the C assignment solver (setup.py), and it is the one in use where a compiler exists
    if shutil.which("gcc") or shutil.which("cc"):
        backend = run(str(PYTHON), "-c", "import cfmlib.assignment as a; print(a.backend())")
        assert backend.startswith("compiled ("), backend
