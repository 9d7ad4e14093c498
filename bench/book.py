"""Benchmark: how long each chapter takes to execute, top to bottom in a fresh kernel.

Every notebook in ``_toc.yml`` is executed once, in order, the way ``make book`` and the tests do
(a new kernel per chapter, the chapter's own folder as working directory); the wall-clock time of
each and their sum are reported against the targets (no chapter over 60 s, the book under 10 min on
two CPU cores). Nothing is written back to the notebooks.

    python bench/book.py
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
CHAPTER_LIMIT_S = 60.0
BOOK_LIMIT_S = 600.0


def chapters() -> list[Path]:
    """The executable chapters, in the order of the table of contents."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc.get("parts", []) for c in part.get("chapters", [])]
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def execute(path: Path, timeout: int = 1800) -> float:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    return time.perf_counter() - start


def run() -> tuple[str, dict]:
    """Execute every chapter; return a markdown table and the seconds per chapter."""
    seconds = {}
    for path in chapters():
        seconds[path.stem] = execute(path)
        print(f"  {path.stem}: {seconds[path.stem]:.1f} s", flush=True)
    total = sum(seconds.values())
    rows = ["| chapter | seconds | under 60 s |", "|---|---|---|"]
    rows += [f"| {name} | {s:.1f} | {s < CHAPTER_LIMIT_S} |" for name, s in seconds.items()]
    rows.append(f"| **whole book** | **{total:.0f}** ({total / 60:.1f} min) | under 10 min: {total < BOOK_LIMIT_S} |")
    return "\n".join(rows), seconds


def main():
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    table, _ = run()
    print(table)


if __name__ == "__main__":
    main()
