"""The PDF edition: every chapter, its figures, typeset math, contents, page numbers, no blank page.

Checks _build/pdf/flow-matching.pdf, which `make test` prints (`make pdf`, tools/pdf.py)
right after building the HTML. The chapters, their titles and their figures come from
_toc.yml and the chapter sources themselves, not from the PDF tool, so a chapter that the
tool drops or a figure that it loses fails here. Chapter start pages are read from the
named destinations that Chromium writes for the chapters' anchors.

Like the browser test, these tests skip when no Chromium is installed (CI installs it);
the tool's own failure modes are checked on a small book printed here.
"""

import io
import json
import re
import shutil
import sys
import unicodedata
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import pdf as pdf_tool  # noqa: E402

PDF = ROOT / "_build" / "pdf" / "flow-matching.pdf"
HTML = ROOT / "_build" / "html"
RAW_TEX = ("$$", "\\begin{", "\\end{", "\\(", "\\)", "\\[", "\\]")  # in prose; code may hold TeX
HIDDEN = {"remove-cell", "remove-output", "hide-cell"}  # cells whose outputs the PDF leaves out


def chromium_or_skip():
    browser = pdf_tool.chromium()
    if browser is None:
        pytest.skip("no Chromium found: install it (e.g. `apt-get install chromium`) to print and test the PDF")
    return browser


# --- what the book's sources say -------------------------------------------------------------

def toc_chapters():
    """The docnames of _toc.yml's chapters, in order (read here, independently of tools/pdf.py)."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    groups = [part.get("chapters", []) for part in toc["parts"]] if "parts" in toc else [toc.get("chapters", [])]
    return [re.sub(r"\.(md|ipynb)$", "", entry["file"]) for group in groups for entry in group if "file" in entry]


def source(doc):
    for suffix in (".ipynb", ".md"):
        if (ROOT / f"{doc}{suffix}").is_file():
            return ROOT / f"{doc}{suffix}"
    raise AssertionError(f"_toc.yml lists {doc}, which has no .ipynb or .md source")


def markdown_and_cells(doc):
    path = source(doc)
    if path.suffix == ".md":
        return path.read_text(), []
    cells = json.loads(path.read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return text, [c for c in cells if c["cell_type"] == "code"]


def title(doc):
    """The chapter's title: its first `# ` heading, inline markup dropped."""
    text, _ = markdown_and_cells(doc)
    heading = next((line[2:] for line in text.splitlines() if line.startswith("# ")), None)
    assert heading, f"{source(doc).name} has no `# ` title"
    return re.sub(r"[`*]", "", heading).strip()


def figures(doc):
    """How many PNG figures the chapter's stored outputs show (outside removed or folded cells)."""
    _, cells = markdown_and_cells(doc)
    return sum("image/png" in output.get("data", {})
               for cell in cells if not HIDDEN & set(cell.get("metadata", {}).get("tags", []))
               for output in cell.get("outputs", []))


def has_math(doc):
    text, _ = markdown_and_cells(doc)
    return re.search(r"\$[^$\s]", text) is not None


def squash(text):
    """Text compared without whitespace and with ligatures unfolded (ﬂ -> fl)."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text))


# --- what the PDF holds ----------------------------------------------------------------------

@cache
def book():
    from pypdf import PdfReader

    assert PDF.is_file(), f"{PDF} is missing: run `make pdf`"
    newer = [str(source(doc).relative_to(ROOT)) for doc in toc_chapters()
             if source(doc).stat().st_mtime > PDF.stat().st_mtime]
    assert not newer, f"the PDF is older than {newer}: run `make pdf` again"
    reader = PdfReader(PDF)
    texts, prose = [], []
    for page in reader.pages:
        chunks = []  # the text set in other fonts than the monospaced one of code

        def visit(text, cm, tm, font, size, chunks=chunks):
            if "Mono" not in str((font or {}).get("/BaseFont", "")):
                chunks.append(text)

        texts.append(page.extract_text(visitor_text=visit) or "")
        prose.append("".join(chunks))
    images = [len(page.images) for page in reader.pages]
    dests = {str(name).removeprefix("/"): reader.get_destination_page_number(dest)
             for name, dest in reader.named_destinations.items()}
    return reader, texts, images, dests, prose


@pytest.fixture(scope="module")
def printed():
    chromium_or_skip()
    return book()


def chapter_ranges(dests, count):
    """{doc: range of 0-based page indices}, in _toc.yml order."""
    docs = toc_chapters()
    missing = [doc for doc in docs if f"document-{doc}" not in dests]
    assert not missing, f"chapters of _toc.yml missing from the PDF: {missing}"
    starts = [dests[f"document-{doc}"] for doc in docs]
    assert starts == sorted(starts) and len(set(starts)) == len(starts), f"chapters out of order: {starts}"
    return {doc: range(start, end) for doc, start, end in zip(docs, starts, starts[1:] + [count])}


def fonts(page):
    resources = page.get("/Resources") or {}
    families = set()
    for font in (resources.get("/Font") or {}).values():
        font = font.get_object()
        descriptor = font.get("/FontDescriptor")
        name = descriptor.get_object().get("/FontFamily") if descriptor else font.get("/BaseFont")
        families.add(str(name))
    return families


def test_every_chapter_of_the_toc_starts_a_page_with_its_title(printed):
    reader, texts, _, dests, _ = printed
    ranges = chapter_ranges(dests, len(texts))
    assert len(ranges) == len(toc_chapters()) >= 10
    for doc, pages in ranges.items():
        assert squash(title(doc)) in squash(texts[pages.start]), \
            f"page {pages.start + 1}, where {doc} starts, does not show its title {title(doc)!r}"


def test_every_chapter_shows_its_figures(printed):
    _, texts, images, dests, _ = printed
    expected = {doc: figures(doc) for doc in toc_chapters()}
    for doc, pages in chapter_ranges(dests, len(texts)).items():
        if source(doc).suffix == ".ipynb":
            assert expected[doc] >= 1, f"{doc} stores no figure: execute it and save its outputs"
        found = sum(images[i] for i in pages)
        assert found >= expected[doc], \
            f"{doc}: {found} images on pages {pages.start + 1}-{pages.stop}, its notebook has {expected[doc]} figures"


def test_math_is_typeset_and_no_raw_tex_is_left(printed):
    reader, texts, _, dests, prose = printed
    for i, text in enumerate(prose):
        left = [tex for tex in RAW_TEX if tex in text]
        assert not left, f"page {i + 1} shows raw TeX {left}: MathJax did not typeset it"
    for doc, pages in chapter_ranges(dests, len(texts)).items():
        if has_math(doc):
            assert any(f.startswith("MathJax") for i in pages for f in fonts(reader.pages[i])), \
                f"{doc} has math but none of its pages uses MathJax's fonts"


def test_cover_and_contents_with_the_right_page_numbers(printed):
    _, texts, _, dests, _ = printed
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert squash(config["title"]) in squash(texts[0]), "the cover does not show the book's title"
    assert squash(pdf_tool.pages_url(config["repository"]["url"])) in squash(texts[0])
    ranges = chapter_ranges(dests, len(texts))
    front = [unicodedata.normalize("NFKC", texts[i]) for i in range(min(r.start for r in ranges.values()))]
    contents = next((t for t in front if t.lstrip().startswith("Contents")), None)
    assert contents, "no page of contents before the first chapter"
    for doc, pages in ranges.items():
        # the title (spaced as it may be), then the page where the chapter starts, then no digit
        entry = r"\s*".join(map(re.escape, squash(title(doc)))) + rf"\s*{pages.start + 1}(?!\d)"
        assert re.search(entry, contents), \
            f"the contents do not give {title(doc)!r} with page {pages.start + 1}, where it starts"


FOOTER = r"(?<!\d){page} / {count}\s*$"


def test_every_page_is_numbered(printed):
    _, texts, _, _, _ = printed
    count = len(texts)
    assert count > 50
    for i, text in enumerate(texts):
        assert re.search(FOOTER.format(page=i + 1, count=count), text), \
            f"page {i + 1} has no page number `{i + 1} / {count}` at its foot"


def test_no_page_is_blank(printed):
    _, texts, images, _, _ = printed
    count = len(texts)
    for i, text in enumerate(texts):
        body = re.sub(FOOTER.format(page=i + 1, count=count), "", text).strip()
        assert body or images[i], f"page {i + 1} is blank"


def test_the_html_offers_the_pdf_for_download(printed):
    index = HTML / "index.html"
    if not index.is_file():
        pytest.skip("no HTML book in _build/html: the PDF is copied there when it is built")
    assert re.search(rf'<a [^>]*href="{re.escape(pdf_tool.PDF_NAME)}"', index.read_text()), \
        "the landing page (index.md) does not link to the PDF"
    copy = HTML / pdf_tool.PDF_NAME
    assert copy.is_file() and copy.read_bytes() == PDF.read_bytes(), \
        "_build/html does not hold this PDF: `make pdf` copies it there after the HTML build"


# --- the tool on a small book: it prints one, and refuses to print a broken one ---------------

PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>Mini</title>
<script>window.MathJax = {{"options": {{"processHtmlClass": "math"}}}}</script>
<script defer src="_static/mathjax/tex-chtml.js"></script></head>
<body><article class="bd-article"><section id="mini"><h1>Mini</h1><div class="toctree-wrapper">
<span id="document-one"></span><section id="one"><h2>Chapter one</h2>
<p>An identity: <span class="math notranslate nohighlight">\\({formula}\\)</span>.</p>
<img src="{image}" alt="a figure"></section>
<span id="document-two"></span><section id="two"><h2>Chapter two</h2>
<div class="math notranslate nohighlight">\\[\\int_0^1 t \\, dt = \\frac{{1}}{{2}}\\]</div>
<section id="two-more"><h3>More</h3><p>{more}</p></section></section>
</div></section></article></body></html>"""


def mini_book(tmp_path, *, image="figure.png", mathjax=True, chapters=("one", "two"), formula="a^2 + b^2 = c^2"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mathjax_dir = ROOT / "_static" / "mathjax"
    assert (mathjax_dir / "tex-chtml.js").is_file(), "MathJax is missing: run `make venv`"
    single = tmp_path / "single"
    (single / "_static").mkdir(parents=True)
    if mathjax:
        (single / "_static" / "mathjax").symlink_to(mathjax_dir)
    plt.figure(figsize=(3, 2))
    plt.plot([0, 1], [0, 1])
    plt.savefig(single / "figure.png")
    plt.close()
    (single / "index.html").write_text(PAGE.format(image=image, formula=formula, more="Some words. " * 40))
    (tmp_path / "_toc.yml").write_text(yaml.safe_dump(
        {"format": "jb-book", "root": "index", "parts": [{"caption": "Part", "chapters": [{"file": c} for c in chapters]}]}))
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(
        {"title": "A mini book", "author": "Someone", "repository": {"url": "https://github.com/Some-One/mini"}}))
    return single


def print_mini(tmp_path, **kwargs):
    single = mini_book(tmp_path, **kwargs)
    out = tmp_path / "mini.pdf"
    summary = pdf_tool.print_book(single, out, browser=chromium_or_skip(),
                                  toc_file=tmp_path / "_toc.yml", config_file=tmp_path / "_config.yml")
    return out, summary


def test_the_tool_prints_a_small_book(tmp_path):
    from pypdf import PdfReader

    out, summary = print_mini(tmp_path)
    reader = PdfReader(out)
    texts = [page.extract_text() for page in reader.pages]
    assert summary["pages"] == len(texts) >= 4  # cover, contents, one page per chapter
    assert "A mini book" in texts[0] and "https://some-one.github.io/mini/" in texts[0]
    (one_title, one), (two_title, two) = summary["chapters"].values()
    assert (one_title, two_title) == ("Chapter one", "Chapter two") and 2 < one < two
    assert "Chapter one" in texts[one - 1] and "Chapter two" in texts[two - 1]
    assert re.search(rf"Chapter one\s*{one}\b", texts[1]) and re.search(rf"Chapter two\s*{two}\b", texts[1])
    assert sum(len(reader.pages[i].images) for i in range(one - 1, two - 1)) == 1
    assert not any(tex in text for text in texts for tex in RAW_TEX)
    assert summary["formulas"] == 2
    assert [item.title for item in reader.outline if not isinstance(item, list)] == ["Contents", "Part"]


@pytest.mark.parametrize("breakage, message", [
    (dict(image="no-such-figure.png"), "images that did not load"),
    (dict(mathjax=False), "MathJax typeset nothing"),
    (dict(chapters=("one", "two", "three")), "not in the single-page build: ['three']"),
    (dict(formula="x^2^3"), "MathJax errors: ['Double exponent: use braces to clarify: x^2^3 (one)']"),
])
def test_the_tool_refuses_to_print_a_broken_book(tmp_path, breakage, message):
    with pytest.raises(pdf_tool.PdfError, match=re.escape(message)):
        print_mini(tmp_path, **breakage)


def test_toc_parts_follow_the_toc(tmp_path):
    toc = tmp_path / "_toc.yml"
    toc.write_text(yaml.safe_dump({"format": "jb-book", "root": "index", "parts": [
        {"caption": "A", "chapters": [{"file": "x/one.ipynb"}, {"file": "x/two", "sections": [{"file": "x/two_b"}]}]},
        {"caption": "B", "chapters": [{"file": "x/three.md"}, {"url": "https://example.org"}]}]}))
    assert pdf_tool.toc_parts(toc) == [{"caption": "A", "chapters": ["x/one", "x/two"]},
                                       {"caption": "B", "chapters": ["x/three"]}]
    assert toc_chapters() == [d for part in pdf_tool.toc_parts() for d in part["chapters"]]


@pytest.mark.parametrize("script, message", [
    ("exec sleep 60", "Chromium did not answer within 1 s (waiting for Browser.getVersion)"),
    ("exit 3", "Chromium exited"),
])
def test_the_devtools_client_reports_a_silent_or_dead_browser(tmp_path, script, message):
    import tempfile

    browser = tmp_path / "browser"
    browser.write_text(f"#!/bin/sh\n{script}\n")
    browser.chmod(0o755)
    with tempfile.TemporaryFile() as log:
        tools = pdf_tool.DevTools(str(browser), tmp_path / "profile", log)
        try:
            with pytest.raises(pdf_tool.PdfError, match=re.escape(message)):
                tools.call("Browser.getVersion", timeout=1)
        finally:
            tools.process.kill()
            tools.close()


def test_the_tool_notices_contents_that_outgrow_their_pages(tmp_path, monkeypatch):
    """Page numbers are written into room kept for them; if they took more, the pages would move."""
    monkeypatch.setattr(pdf_tool, "FILL_PAGES_JS", """((pages) => {
      for (const span of document.querySelectorAll("#pdf-toc .pdf-page")) span.textContent = "9 ".repeat(3000);
    })""")
    with pytest.raises(pdf_tool.PdfError, match="moved the pages after it"):
        print_mini(tmp_path)
