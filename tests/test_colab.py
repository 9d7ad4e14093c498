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
