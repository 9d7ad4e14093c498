"""The built book renders offline: math is typeset and nothing comes from the network.

Checks the HTML that `make test` (or `make book`) has just built in
_build/html; see the order of steps in the Makefile. The pages are served on
127.0.0.1 and opened in headless Chromium with every host lookup blocked.
"""

import functools
import http.server
import re
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
PAGES = sorted(p for p in HTML.rglob("*.html") if "_static" not in p.parts) if HTML.is_dir() else []

pytestmark = pytest.mark.skipif(not PAGES, reason="no built book in _build/html: run `make test` or `make book`")

NETWORK = re.compile(r"^(https?:)?//", re.IGNORECASE)
RESOURCE_LINKS = {"stylesheet", "preload", "modulepreload", "prefetch", "preconnect", "dns-prefetch", "icon", "manifest"}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9",
    "--virtual-time-budget=15000",
]


class Resources(HTMLParser):
    """Collects the URLs a page loads by itself (not the links a reader may click)."""

    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "link" and RESOURCE_LINKS & set((attrs.get("rel") or "").lower().split()):
            self.urls.append(attrs.get("href"))
        elif tag in {"script", "img", "iframe", "source", "embed", "audio", "video", "track"}:
            self.urls += [attrs.get("src"), *(u.split()[0] for u in (attrs.get("srcset") or "").split(",") if u.strip())]
        elif tag == "object":
            self.urls.append(attrs.get("data"))


def network_resources(page):
    parser = Resources()
    parser.feed(page.read_text(encoding="utf-8"))
    return [url for url in parser.urls if url and NETWORK.match(url.strip())]


def has_math(page):
    return re.search(r'class="[^"]*\bmath\b', page.read_text(encoding="utf-8")) is not None


def test_no_page_loads_anything_from_the_network():
    offenders = {str(p.relative_to(HTML)): network_resources(p) for p in PAGES}
    css = {str(p.relative_to(HTML)): re.findall(r"(?:@import|url\()\s*['\"]?(?:https?:)?//[^'\")\s]+", p.read_text(errors="replace"))
           for p in HTML.rglob("*.css")}
    assert not {k: v for k, v in {**offenders, **css}.items() if v}


def test_mathjax_is_served_locally():
    assert (HTML / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert any(has_math(p) for p in PAGES), "no page has math: the math check below would test nothing"


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no Chromium found: install it (e.g. `apt-get install chromium`) to run the browser test")


@pytest.fixture(scope="module")
def server():
    handler = functools.partial(QuietHandler, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def visible_text(dom):
    """The page's text outside scripts, styles, code blocks and MathJax output."""
    for tag in ("script", "style", "pre", "mjx-container"):
        dom = re.sub(rf"<{tag}\b.*?</{tag}>", " ", dom, flags=re.DOTALL | re.IGNORECASE)
    return re.sub(r"<[^>]+>", " ", dom)


@pytest.mark.parametrize("page", [p for p in PAGES if has_math(p)], ids=lambda p: str(p.relative_to(HTML)))
def test_math_is_typeset(page, server, tmp_path):
    browser = chromium()
    url = f"{server}/{page.relative_to(HTML).as_posix()}"
    result = subprocess.run(
        [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    dom = result.stdout
    assert "</html>" in dom, f"Chromium printed no page ({result.returncode}): {result.stderr[-2000:]}"
    assert "<mjx-container" in dom, "MathJax did not typeset this page"
    text = visible_text(dom)
    for raw in ("$$", "\\(", "\\["):
        assert raw not in text, f"raw TeX {raw!r} left on the page"
