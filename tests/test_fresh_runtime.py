"""The setup cell works in a fresh runtime that has only what Colab gives us.

`make test` first creates .venv-colab (torch, numpy, matplotlib, scipy,
ipykernel) and a wheelhouse with cfmlib's other dependencies in .cache/wheels
(see the Makefile). Here, without the network, the preface runs end to end in
that runtime: its setup cell installs cfmlib from this checkout, and torch
must be left exactly as it was.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

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
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def test_setup_cell_installs_cfmlib_and_leaves_torch_alone(monkeypatch, tmp_path):
    offline_pip_env(monkeypatch)
    run(str(PYTHON), "-m", "pip", "uninstall", "--yes", "--quiet", "cfmlib")
    torch_before = run(str(PYTHON), "-c", TORCH_INFO)

    # cfmlib is installed from a copy of this checkout, as Colab would from git.
    source = tmp_path / "cfmlib-source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "cfmlib", source / "cfmlib", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setenv("CFMLIB_SOURCE", source.as_uri())

    # A kernel running in .venv-colab.
    kernel = tmp_path / "jupyter" / "kernels" / "colab"
    kernel.mkdir(parents=True)
    argv = [str(PYTHON), "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernel / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "colab", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))

    nb = nbformat.read(PREFACE, as_version=4)
    client = NotebookClient(
        nb, kernel_name="colab", timeout=1800, resources={"metadata": {"path": str(PREFACE.parent)}}
    )
    client.execute()  # raises CellExecutionError if any cell fails

    setup_output = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    assert setup_output.startswith("cfmlib"), setup_output
    assert run(str(PYTHON), "-c", "import cfmlib; print(cfmlib.__file__)").startswith(str(COLAB))
    assert run(str(PYTHON), "-c", TORCH_INFO) == torch_before, "pip reinstalled torch"
