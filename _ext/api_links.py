"""Small Sphinx extension: every entry of the API appendix links to the chapter section that derives it.

For each object that autodoc documents (a function, class, method, property or constant of
``cfmlib``), the chapters' code cells (and the code the text names in backticks) are searched for
the place where the object is used, and a
line "Derived in Chapter N, *section*" with a cross-reference to that section is appended to its
documentation.  The chapters the docstring names ("chapter 5", "chapters 7 and 9"; else those its
module names) are preferred, and within them the first section that calls the object; a method
that no chapter calls by name links where its class is used.  The sections get labels of their own
(``derivation:<document>:<n>``, the n-th ``##`` section), so the links resolve in every builder
(the HTML book, the single page of the PDF) and a link that cannot be resolved fails the build
(``-n -W``).  An object that no chapter uses and no docstring places is reported as a warning,
which fails the build too.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

#: Method names too common to find by name alone (``.sample(`` is called on many objects).
GENERIC = {"forward", "sample", "alpha", "sigma", "d_alpha", "d_sigma", "loss", "to", "update", "sync", "next",
           "close", "compare", "record", "check", "field", "log_prob", "score", "exp", "log", "proj", "dist",
           "step", "kappa", "d_kappa", "indices", "pair", "fit", "features", "n_features", "check_data",
           "check_batch", "draw_x0", "draw_t", "coupling_source", "velocity", "posterior", "mean", "std", "lo",
           "hi", "inner", "geodesic", "uniform", "rate", "decay_at", "extra_repr", "encode", "decode"}

_CHAPTER = re.compile(r"[Cc]hapters?\s+((?:\d+(?:\s*[-–,]\s*|\s+and\s+)?)+)")


class _Index:
    """Where each name is used: (chapter number, document, section index, section title) per code cell."""

    def __init__(self, srcdir: Path):
        self.cells = []  # (chapter, docname, section index, title, code)
        self.titles = {}  # docname -> [section titles]
        self.aliases = {}  # module -> names the chapters give it ("from cfmlib import discrete as D")
        for path in sorted((srcdir / "chapters").glob("[0-9][0-9]_*.ipynb")):
            chapter, doc = int(path.name[:2]), f"chapters/{path.stem}"
            section, title, titles = 0, "", []
            for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
                src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
                if cell["cell_type"] == "markdown":
                    for line in src.splitlines():
                        if line.startswith("## "):
                            titles.append(line[3:].strip())
                            section, title = len(titles), line[3:].strip()
                        elif section:  # the text names library code in backticks: `cfm_loss`, `paths.VPPath`
                            code = " ".join(re.findall(r"`([^`]+)`", line))
                            if code:
                                self.cells.append((chapter, doc, section, title, code))
                elif cell["cell_type"] == "code":
                    for module, alias in re.findall(r"from cfmlib import (\w+) as (\w+)", src) + \
                            re.findall(r"import cfmlib\.(\w+) as (\w+)", src):
                        self.aliases.setdefault(module, set()).add(alias)
                    if section:
                        self.cells.append((chapter, doc, section, title, src))
            self.titles[doc] = titles
        self.chapter_of = {doc: int(doc.split("/")[1][:2]) for doc in self.titles}

    def find(self, patterns, chapters):
        """The first cell or sentence (in chapter order) matching any pattern, preferring ``chapters``."""
        hits = [c for c in self.cells if any(p.search(c[4]) for p in patterns)]
        preferred = [c for c in hits if c[0] in chapters]
        anywhere = [c for c in hits if c[0] != 0]  # the preface only tours the library
        best = preferred or anywhere
        return best[0] if best else None


def _chapters_named(text: str) -> list[int]:
    out = []
    for group in _CHAPTER.findall(text or ""):
        for a, b in re.findall(r"(\d+)(?:\s*[-–]\s*(\d+))?", group):
            out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def _patterns(what: str, name: str, aliases=None):
    parts = name.split(".")
    short = parts[-1]
    if what in ("method", "attribute", "property"):
        if short in GENERIC or short.startswith("_"):
            return None  # found through the class
        return [re.compile(rf"\.{re.escape(short)}\b")]
    module = parts[1] if len(parts) > 2 else ""
    pats = [re.compile(rf"\b{re.escape(m)}\.{re.escape(short)}\b")
            for m in ({module} | set((aliases or {}).get(module, ()))) if m]
    pats.append(re.compile(rf"(?<![\w.]){re.escape(short)}\s*\("))
    pats.append(re.compile(rf"import[^\n]*\b{re.escape(short)}\b"))
    if short.isupper() or what == "class" or "_" in short:  # distinctive enough on its own
        pats.append(re.compile(rf"(?<![\w.]){re.escape(short)}\b"))
    return pats


def _append_link(app, what, name, obj, options, lines):
    if not name.startswith("cfmlib.") or what == "module":
        return
    index: _Index = app.env.cfmlib_api_index
    doc = inspect.getdoc(obj) or ""
    parts = name.split(".")
    owner = ".".join(parts[:3]) if what in ("method", "attribute", "property") and len(parts) > 3 else None
    mod_doc = inspect.getdoc(__import__(".".join(parts[:2]), fromlist=["_"])) or ""
    chapters = _chapters_named(doc) or _chapters_named(mod_doc.split("\n\n")[0])
    hit = None
    pats = _patterns(what, name, index.aliases)
    if pats:
        hit = index.find(pats, chapters)
    if hit is None and owner is not None:
        hit = index.find(_patterns("class", owner, index.aliases), chapters)
    if hit is None:
        if not chapters:
            logger.warning(f"{name}: no chapter uses it and its docstring names none; say which chapter derives it")
            return
        target = next((d for d, n in index.chapter_of.items() if n == chapters[0]), None)
        if target is None:
            logger.warning(f"{name}: its docstring names chapter {chapters[0]}, which does not exist")
            return
        where = "the preface" if chapters[0] == 0 else f"Chapter {chapters[0]}"
        lines += ["", f"*Derived in* :doc:`{where} </{target}>`."]
        return
    chapter, docname, section, title, _ = hit
    where = "the preface" if chapter == 0 else f"Chapter {chapter}"
    lines += ["", f"*Derived in* {where}, :ref:`derivation:{docname}:{section}`."]


def _label_sections(app, doctree):
    """Give each ``##`` section of a chapter a label, ``derivation:<document>:<n>``."""
    docname = app.env.docname
    titles = app.env.cfmlib_api_index.titles.get(docname)
    if titles is None:
        return
    top = next(iter(doctree.findall(nodes.section)), None)
    if top is None:
        return
    sections = [s for s in top.children if isinstance(s, nodes.section)]
    if len(sections) != len(titles):
        logger.warning(f"{docname}: {len(sections)} sections in the document but {len(titles)} '## ' headings "
                       f"in the notebook; the API appendix cannot link to them")
        return
    std = app.env.get_domain("std")
    for n, section in enumerate(sections, start=1):
        label = f"derivation:{docname}:{n}"
        title = section.next_node(nodes.title).astext()
        std.anonlabels[label] = (docname, section["ids"][0])
        std.labels[label] = (docname, section["ids"][0], title)


def _index(app):
    app.env.cfmlib_api_index = _Index(Path(app.srcdir))


def setup(app):
    app.connect("builder-inited", _index)
    app.connect("autodoc-process-docstring", _append_link)
    app.connect("doctree-read", _label_sections)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
