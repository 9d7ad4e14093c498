"""Print the whole book as one PDF with the system's headless Chromium.

    make pdf                         # the single-page build, then this script
    python tools/pdf.py              # print _build/singlehtml into _build/pdf/flow-matching.pdf
    python tools/pdf.py --optional   # without Chromium: say so and exit 0 (used by `make test`)

`make pdf` first builds the book as one HTML page with Sphinx's singlehtml
builder, from the notebooks' stored outputs (nothing is executed), into
_build/singlehtml. This script then

1. serves that page on 127.0.0.1 and opens it in headless Chromium with every
   host lookup blocked (the book needs no network, math included), talking to
   it over the DevTools protocol on Chromium's own pipe (--remote-debugging-pipe);
2. waits until MathJax has typeset every formula, the fonts are loaded and
   every image is decoded, and refuses to print a page with raw TeX, a MathJax
   error, a broken image, or without a chapter that _toc.yml lists;
3. adds a cover, a table of contents (the parts and chapters of _toc.yml) and
   print rules: each chapter starts a page, code wraps, figures stay whole,
   folded hints and solutions are shown, folded code cells left out;
4. prints (Page.printToPDF: A4, page numbers in the footer, bookmarks from the
   headings), reads on which page each chapter starts, writes those numbers
   into the table of contents and prints again, checking that they still hold;
5. writes _build/pdf/flow-matching.pdf and copies it into _build/html when the
   HTML book is there: its landing page links to it.
"""

import argparse
import base64
import functools
import http.server
import io
import json
import logging
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from pypdf import PdfReader, PdfWriter
from pypdf.generic import NameObject

logging.getLogger("pypdf").setLevel(logging.ERROR)  # its notes on Chromium's object count are noise

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ROOT / "_build" / "singlehtml"
PDF_NAME = "flow-matching.pdf"  # the landing page (index.md) links to this name
OUT = ROOT / "_build" / "pdf" / PDF_NAME
HTML = ROOT / "_build" / "html"

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--no-first-run", "--disable-quic", "--hide-scrollbars", "--mute-audio",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9",
]
TIMEOUT = 600  # seconds for any one step (loading, typesetting, printing); a few on an idle machine

# Page.printToPDF: A4 portrait, page numbers centred in the footer.
FOOTER = ('<div style="width:100%; font-size:8pt; text-align:center; color:#444;'
          ' font-family:sans-serif;"><span class="pageNumber"></span> / <span class="totalPages"></span></div>')
PRINT = dict(paperWidth=8.27, paperHeight=11.69, marginTop=0.6, marginBottom=0.75, marginLeft=0.65,
             marginRight=0.65, printBackground=True, displayHeaderFooter=True,
             headerTemplate="<span></span>", footerTemplate=FOOTER,
             generateTaggedPDF=False)  # a tagged PDF takes a quarter longer and is 70 % larger

# Print rules added to the page; the theme's own print style sheet already hides
# the navigation bars and sidebars.
CSS = """
html, body { background: white !important; }
#jb-print-docs-body, .bd-header-article, .prev-next-area, .bd-footer-content, .bd-footer,
.headerlink, .pdf-download { display: none !important; }
.bd-main .bd-content .bd-article-container { max-width: 100% !important; }
.pdf-chapter { display: block; break-before: page; }
#pdf-cover { height: 9.4in; display: flex; flex-direction: column; justify-content: center; text-align: center;
             break-after: page; }
#pdf-cover .pdf-title { font-size: 2.4em; font-weight: bold; margin-bottom: 0.8em; }
#pdf-cover .pdf-author { font-size: 1.3em; margin-bottom: 2em; }
#pdf-cover .pdf-where { font-size: 0.95em; color: #444; }
#pdf-toc { break-after: page; }
#pdf-toc h2 { margin-bottom: 0.8em; }
#pdf-toc .pdf-part { font-weight: bold; margin: 1em 0 0.3em 0; break-after: avoid; }
#pdf-toc a.pdf-entry { display: flex; color: inherit; text-decoration: none; margin: 0.25em 0 0.25em 1.2em; }
#pdf-toc .pdf-dots { flex: 1; border-bottom: 1px dotted #888; margin: 0 0.4em 0.3em 0.4em; }
#pdf-toc .pdf-page { min-width: 2.5em; text-align: right; font-variant-numeric: tabular-nums; }
pre, pre code { white-space: pre-wrap !important; word-break: break-word; overflow: visible !important; }
.cell_output, .output, div.highlight { overflow: visible !important; max-height: none !important; }
img, figure, mjx-container[display="true"], .cell_output .output.image_png { break-inside: avoid; }
img { max-width: 100% !important; height: auto; }
h1, h2, h3, h4 { break-after: avoid; }
.toggle-hidden, .dropdown .admonition-title ~ * { display: block !important; visibility: visible !important; }
"""

# Waits for MathJax, the fonts and the images; returns what is wrong with the page.
CHECK_JS = """
(async (chapters) => {
  const pause = ms => new Promise(resolve => setTimeout(resolve, ms));
  document.documentElement.dataset.theme = "light";
  document.documentElement.dataset.mode = "light";
  const mathjax = () => window.MathJax && MathJax.startup && MathJax.startup.promise;
  if (document.querySelector(".math")) {
    // MathJax is a deferred script, run before the load event; allow it a few seconds more
    for (const start = Date.now(); !mathjax() && Date.now() - start < 5000;) await pause(50);
    if (mathjax()) await MathJax.startup.promise;
  }
  await document.fonts.ready;
  await Promise.all([...document.images].map(img => img.decode().catch(() => null)));
  // where a problem is: the chapter whose anchor comes last before it
  const anchors = chapters.map(doc => document.getElementById("document-" + doc)).filter(Boolean);
  const where = node => {
    let found = "the opening page";
    for (const a of anchors) if (a.compareDocumentPosition(node) & Node.DOCUMENT_POSITION_FOLLOWING) found = a.id.slice(9);
    return found;
  };
  const broken = [...document.images].filter(img => !img.complete || img.naturalWidth === 0)
                                     .map(img => `${img.getAttribute("src")} (${where(img)})`);
  const missing = chapters.filter(doc => !document.getElementById("document-" + doc));
  const mathErrors = mathjax() ? [...MathJax.startup.document.math]
    .filter(item => item.typesetRoot && item.typesetRoot.querySelector("mjx-merror"))
    .map(item => `${item.typesetRoot.querySelector("mjx-merror").getAttribute("data-mjx-error")}: `
                 + `${item.math.trim().slice(0, 100)} (${where(item.typesetRoot)})`) : [];
  // raw TeX in the text a reader sees (code, scripts and typeset math left out)
  const raw = [];
  const walker = document.createTreeWalker(document.querySelector("article") || document.body,
                                           NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest("pre, code, script, style, mjx-container, .highlight")) continue;
    for (const tex of ["$$", "\\\\(", "\\\\[", "\\\\begin{"]) {
      if (node.data.includes(tex)) raw.push(`${node.data.trim().slice(0, 80)} (${where(node)})`);
    }
  }
  return {broken, missing, mathErrors, raw,
          typeset: document.querySelectorAll("mjx-container").length,
          math: document.querySelectorAll(".math").length,
          images: document.images.length};
})
"""

# Adds the cover, the table of contents and the chapter page breaks.
PREPARE_JS = """
((book, parts) => {
  const el = (tag, props = {}, children = []) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };
  const style = el("style", {textContent: book.css});
  document.head.append(style);
  // the code the HTML folds away (myst-nb's hidden cells and inputs) stays out of print;
  // everything else that folds (hints, solutions, hidden outputs) is printed open
  document.querySelectorAll("details.hide.above-input").forEach(details => details.remove());
  for (const details of document.querySelectorAll("details")) details.open = true;
  const article = document.querySelector("article.bd-article") || document.querySelector("article");
  // the landing page's own title: the cover carries it
  const first = article.querySelector("h1");
  if (first) first.style.display = "none";

  const cover = el("section", {id: "pdf-cover"}, [
    el("div", {className: "pdf-title", textContent: book.title}),
    el("div", {className: "pdf-author", textContent: book.author}),
    el("div", {className: "pdf-where", textContent: book.online}),
    el("div", {className: "pdf-where", textContent: book.source}),
    el("a", {href: "#pdf-toc", style: "display: none"}),  // so that the PDF names the contents' page
  ]);
  const toc = el("nav", {id: "pdf-toc"}, [el("h2", {textContent: "Contents"})]);
  const text = node => {
    const copy = node.cloneNode(true);
    copy.querySelectorAll(".headerlink").forEach(a => a.remove());
    return copy.textContent.replace(/\\s+/g, " ").trim();
  };
  const chapters = {};
  for (const part of parts) {
    if (part.caption) toc.append(el("div", {className: "pdf-part", textContent: part.caption}));
    for (const doc of part.chapters) {
      const anchor = document.getElementById("document-" + doc);
      anchor.classList.add("pdf-chapter");
      // the chapter's title: the first heading after its anchor
      const walker = document.createTreeWalker(article, NodeFilter.SHOW_ELEMENT);
      walker.currentNode = anchor;
      let heading = walker.nextNode();
      while (heading && !/^H[1-3]$/.test(heading.tagName)) heading = walker.nextNode();
      const section = heading && heading.closest("section");
      chapters[doc] = {
        title: heading ? text(heading) : doc,
        sections: section ? [...section.querySelectorAll(":scope > section[id]")]
          .filter(s => s.querySelector("h1, h2, h3, h4, h5, h6"))
          .map(s => ({id: s.id, title: text(s.querySelector("h1, h2, h3, h4, h5, h6"))})) : [],
      };
      // in print the title leads, even if a chapter puts something above it
      if (heading && !(anchor.nextElementSibling === section && section.firstElementChild === heading)) {
        anchor.after(heading);
      }
      toc.append(el("a", {className: "pdf-entry", href: "#document-" + doc}, [
        el("span", {textContent: chapters[doc].title}),
        el("span", {className: "pdf-dots"}),
        el("span", {className: "pdf-page"}),
      ]));
      toc.lastChild.lastChild.dataset.doc = doc;
    }
  }
  // a mark on the page after the contents, named in the PDF like the contents (by a link to it)
  const after = el("div", {id: "pdf-after-toc"});
  cover.append(el("a", {href: "#pdf-after-toc", style: "display: none"}));
  article.prepend(cover, toc, after);
  return chapters;
})
"""

FILL_PAGES_JS = """
((pages) => {
  for (const span of document.querySelectorAll("#pdf-toc .pdf-page")) span.textContent = pages[span.dataset.doc];
})
"""


class PdfError(RuntimeError):
    """The PDF could not be made; the message says why and what to do."""


def chromium():
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    return None


def toc_parts(toc_file=ROOT / "_toc.yml"):
    """[{"caption": ..., "chapters": [docname, ...]}, ...]: the parts and chapters of _toc.yml, in order.

    The root page is the book's opening (before the contents); a chapter's own sub-pages
    (`sections:`) print inside it.
    """
    toc = yaml.safe_load(Path(toc_file).read_text())

    def docnames(entries):
        return [str(Path(entry["file"]).with_suffix("")) if Path(entry["file"]).suffix in {".md", ".ipynb"}
                else entry["file"] for entry in entries or [] if "file" in entry]

    if "parts" in toc:
        return [{"caption": part.get("caption"), "chapters": docnames(part.get("chapters"))} for part in toc["parts"]]
    return [{"caption": None, "chapters": docnames(toc.get("chapters"))}]


def pages_url(repository_url):
    """Where GitHub Pages publishes the book of `repository_url` (https://github.com/OWNER/REPO)."""
    path = repository_url.rstrip("/").removesuffix(".git").split("github.com/", 1)
    if len(path) != 2 or len(path[1].split("/")) != 2:
        raise PdfError(f"_config.yml: repository url {repository_url!r} is not https://github.com/OWNER/REPO")
    owner, repo = path[1].split("/")
    host = f"{owner.lower()}.github.io"
    return f"https://{host}/" if repo.lower() == host else f"https://{host}/{repo}/"


def book_info(config_file=ROOT / "_config.yml"):
    """The cover's title, author and addresses (the published book's, and the repository's)."""
    config = yaml.safe_load(Path(config_file).read_text())
    url = config["repository"]["url"].rstrip("/").removesuffix(".git")
    return {"title": config["title"], "author": config.get("author", ""),
            "online": f"Online: {pages_url(url)}", "source": f"Source: {url}"}


class DevTools:
    """The DevTools protocol over Chromium's --remote-debugging-pipe.

    Chromium reads commands from its file descriptor 3 and writes replies and
    events to its descriptor 4, one JSON message each, ended by a NUL byte.
    """

    def __init__(self, browser, user_data_dir, log):
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # bash puts the two pipe ends where Chromium looks for them, then runs it.
        command = f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-'
        self.process = subprocess.Popen(
            ["bash", "-c", command, browser, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}",
             "--remote-debugging-pipe", "about:blank"],
            pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = bytearray()
        self._events = []
        self._id = 0

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except PdfError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._write)
        os.close(self._read)

    def _message(self, deadline, timeout, waiting_for):
        while (end := self._buffer.find(b"\0")) < 0:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise PdfError(f"Chromium did not answer within {timeout:.0f} s ({waiting_for})")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise PdfError(f"Chromium exited while {waiting_for} (exit code {self.process.poll()})")
            self._buffer += chunk
        message = json.loads(self._buffer[:end])
        del self._buffer[:end + 1]
        return message

    def call(self, method, session=None, timeout=TIMEOUT, **params):
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._write, data):]
        except BrokenPipeError:
            raise PdfError(f"Chromium exited before {method} (exit code {self.process.poll()})") from None
        deadline = time.monotonic() + timeout
        while True:
            reply = self._message(deadline, timeout, f"waiting for {method}")
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise PdfError(f"{method} failed: {reply['error'].get('message')}")
                return reply["result"]
            self._events.append(reply)

    def wait_for(self, event, session, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        while True:
            for i, message in enumerate(self._events):
                if message.get("method") == event and message.get("sessionId") == session:
                    return self._events.pop(i)
            self._events.append(self._message(deadline, timeout, f"waiting for {event}"))

    def evaluate(self, session, expression, *args):
        """Runs `expression` (a JavaScript function) on JSON arguments and returns its result."""
        call = f"({expression})({', '.join(json.dumps(a) for a in args)})"
        result = self.call("Runtime.evaluate", session, expression=call, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise PdfError(f"script error in the page: {details.get('exception', {}).get('description') or details}")
        return result["result"].get("value")


def squashed(page):
    """The page's text without whitespace (whose extraction from typeset math varies between prints)."""
    return "".join(page.extract_text().split())


def print_pdf(tools, session, **options):
    return base64.b64decode(tools.call("Page.printToPDF", session, **PRINT, **options)["data"])


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def destinations(reader):
    """{name: 1-based page} of the PDF's named destinations: Chromium names one per link target."""
    return {str(name).removeprefix("/"): reader.get_destination_page_number(dest) + 1
            for name, dest in reader.named_destinations.items()}


def chapter_pages(dests, docs):
    """{docname: 1-based page on which the chapter starts}."""
    missing = [doc for doc in docs if f"document-{doc}" not in dests]
    if missing:
        raise PdfError(f"no page found for the chapters {missing} in the PDF")
    return {doc: dests[f"document-{doc}"] for doc in docs}


def assemble(book, contents, first, count, parts, chapters):
    """`book` with its `count` pages from page `first` on drawn as the first pages of `contents`.

    `contents` is the second print of the table of contents' pages, with page numbers; only
    what those pages draw is taken from it (their links and everything else stay the book's).
    The bookmarks are the contents, then each part, its chapters and their sections.
    """
    dests = destinations(book)
    writer = PdfWriter(clone_from=book)
    for i in range(count):
        page, target = contents.pages[i], writer.pages[first - 1 + i]
        for key in ("/Contents", "/Resources"):
            target[NameObject(key)] = page.raw_get(key).clone(writer)
    writer.add_outline_item(title="Contents", page_number=dests["pdf-toc"] - 1)
    for part in parts:
        first_page = dests[f"document-{part['chapters'][0]}"] - 1
        parent = writer.add_outline_item(title=part["caption"], page_number=first_page) if part["caption"] else None
        for doc in part["chapters"]:
            chapter = writer.add_outline_item(title=chapters[doc]["title"], page_number=dests[f"document-{doc}"] - 1,
                                              parent=parent)
            for section in chapters[doc]["sections"]:
                if section["id"] in dests:
                    writer.add_outline_item(title=section["title"], page_number=dests[section["id"]] - 1,
                                            parent=chapter)
    writer.page_mode = "/UseOutlines"
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def print_book(single=SINGLE, out=OUT, browser=None, toc_file=ROOT / "_toc.yml", config_file=ROOT / "_config.yml"):
    """Prints the single-page build `single` into the PDF `out`; returns a summary dict.

    The chapters are those of `toc_file`, the cover's title, author and addresses those of
    `config_file`. Raises PdfError, saying what is wrong, instead of printing a broken book.
    """
    index = single / "index.html"
    if not index.is_file():
        raise PdfError(f"{index} is missing: build the single-page book first (`make pdf` does)")
    browser = browser or chromium()
    if browser is None:
        raise PdfError("no Chromium found: install it (e.g. `apt-get install chromium`) to print the PDF")
    parts = toc_parts(toc_file)
    docs = [doc for part in parts for doc in part["chapters"]]
    if not docs:
        raise PdfError(f"{toc_file} lists no chapters")
    book = {**book_info(config_file), "css": CSS}

    started = time.monotonic()
    httpd = serve(single)
    with tempfile.TemporaryDirectory() as profile, tempfile.TemporaryFile() as log:
        tools = DevTools(browser, profile, log)
        try:
            target = tools.call("Target.createTarget", url="about:blank")["targetId"]
            session = tools.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            tools.call("Page.enable", session)
            tools.call("Page.navigate", session, url=f"http://127.0.0.1:{httpd.server_address[1]}/index.html")
            tools.wait_for("Page.loadEventFired", session)

            state = tools.evaluate(session, CHECK_JS, docs)
            problems = []
            if state["missing"]:
                problems.append(f"chapters listed in _toc.yml but not in the single-page build: {state['missing']}")
            if state["broken"]:
                problems.append(f"images that did not load: {state['broken'][:5]}")
            if state["mathErrors"]:
                problems.append(f"MathJax errors: {state['mathErrors'][:5]}")
            if state["raw"]:
                problems.append(f"raw TeX left in the text: {state['raw'][:5]}")
            if state["math"] and not state["typeset"]:
                problems.append("MathJax typeset nothing")
            if problems:
                raise PdfError("not printing the book:\n  " + "\n  ".join(problems))

            chapters = tools.evaluate(session, PREPARE_JS, book, parts)
            printed = PdfReader(io.BytesIO(print_pdf(tools, session)))
            dests = destinations(printed)
            pages = chapter_pages(dests, docs)
            # Write the page numbers into the contents, whose room for them was kept, and print
            # its pages again, with the page that follows them: that page must not have changed
            # (the contents end with a page break, so then nothing after them has moved).
            tools.evaluate(session, FILL_PAGES_JS, {doc: str(page) for doc, page in pages.items()})
            first, after = dests["pdf-toc"], dests["pdf-after-toc"]
            contents = PdfReader(io.BytesIO(print_pdf(tools, session, pageRanges=f"{first}-{after}")))
            if len(contents.pages) != after - first + 1 or \
                    squashed(contents.pages[-1]) != squashed(printed.pages[after - 1]):
                raise PdfError("the page numbers in the table of contents moved the pages after it")
        except PdfError as error:
            log.seek(0)
            lines = log.read().decode(errors="replace").splitlines()
            tail = "\n".join([line for line in lines if "dbus" not in line][-20:])
            raise PdfError(f"{error}\n--- Chromium's log (last lines) ---\n{tail}") from None
        finally:
            tools.close()
            httpd.shutdown()

    pdf = assemble(printed, contents, first, after - first, parts, chapters)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(pdf)
    return {"pages": len(PdfReader(io.BytesIO(pdf)).pages), "bytes": len(pdf),
            "seconds": time.monotonic() - started,
            "chapters": {doc: (chapters[doc]["title"], pages[doc]) for doc in docs},
            "images": state["images"], "formulas": state["typeset"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--single", type=Path, default=SINGLE, help="the single-page build to print")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write the PDF")
    parser.add_argument("--optional", action="store_true",
                        help="without Chromium, print why there is no PDF and exit 0 (for `make test`)")
    args = parser.parse_args(argv)
    if chromium() is None and args.optional:
        print("pdf: no Chromium found, so no PDF (install it, e.g. `apt-get install chromium`); its test will skip")
        return 0
    try:
        summary = print_book(args.single, args.out)
    except PdfError as error:
        print(f"pdf: {error}", file=sys.stderr)
        return 1
    for doc, (title, page) in summary["chapters"].items():
        print(f"  p. {page:>4}  {title}")
    print(f"pdf: {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}: "
          f"{summary['pages']} pages, {summary['bytes'] / 2**20:.1f} MiB, {summary['images']} images, "
          f"{summary['formulas']} formulas, printed in {summary['seconds']:.0f} s")
    if args.out == OUT and HTML.is_dir():
        shutil.copyfile(args.out, HTML / PDF_NAME)
        print(f"pdf: copied to {(HTML / PDF_NAME).relative_to(ROOT)}, where the landing page links to it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
