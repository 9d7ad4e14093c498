"""Small Sphinx extension: the book's HTML loads nothing from the network.

* MathJax comes from ``_static/mathjax`` (fetched by ``make venv``), and the
  build fails if it is missing instead of silently using a CDN.
* Jupyter Book adds every ``.js`` file under ``_static`` to every page; MathJax
  loads its own extension files on demand, so those are taken out again.
* ``BOOK_EXECUTE=off`` (used by ``make test``, after nbval has executed and
  checked every notebook) builds from the stored outputs without executing.
"""

import os
from pathlib import Path

from sphinx.errors import ConfigError

MATHJAX_DIR = "mathjax/"


def _configure(app, config):
    mathjax = Path(app.srcdir, "_static", config.mathjax_path)
    if not mathjax.is_file():
        raise ConfigError(f"{mathjax} is missing: run `make venv` to fetch MathJax")

    def is_mathjax(entry):
        name = entry if isinstance(entry, str) else entry[0]
        return str(name).startswith(MATHJAX_DIR)

    config.html_js_files = [f for f in config.html_js_files if not is_mathjax(f)]

    mode = os.environ.get("BOOK_EXECUTE")
    if mode:
        config.nb_execution_mode = mode


def setup(app):
    app.connect("config-inited", _configure)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
