"""Every chapter's Colab badge and setup cell match _config.yml."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_colab_cells_are_up_to_date():
    result = subprocess.run(
        [sys.executable, "tools/colab.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_badge_loads_nothing_from_the_network():
    sys.path.insert(0, str(ROOT / "tools"))
    import colab

    line = colab.badge_line("owner/repo", "main", Path("00_preface.ipynb"))
    assert line.startswith("[") and "![" not in line and "<img" not in line
    assert line.endswith("(https://colab.research.google.com/github/owner/repo/blob/main/chapters/00_preface.ipynb)")


def test_chapters_open_with_their_title_and_a_collapsed_setup_cell():
    import json

    for path in sorted((ROOT / "chapters").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        first = "".join(cells[0]["source"])
        assert cells[0]["cell_type"] == "markdown" and first.startswith("# "), path.name
        assert first.index("colab.research.google.com") > first.index("\n"), path.name  # the link under the title
        assert cells[1]["cell_type"] == "code" and "CFMLIB_SOURCE" in "".join(cells[1]["source"]), path.name
        assert "hide-cell" in cells[1]["metadata"].get("tags", []), path.name


def test_a_notebook_without_a_title_is_refused(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import colab
    import pytest

    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": "Some text"}]}
    with pytest.raises(SystemExit, match="must open with"):
        colab.update(nb, tmp_path / "x.ipynb", "owner/repo", "main")
