"""Small Sphinx extension: the single-page build that `make pdf` prints works.

Sphinx writes a node with the handlers an extension registered for the
builder's name and, only when none at all are registered under that name, with
those of the builder's format (``html``).  sphinx-exercise registers handlers
for ``singlehtml``, so from then on the single-page builder, which ``make pdf``
uses (see tools/pdf.py), knows none of the nodes that other extensions taught
only to ``html`` (myst-nb's hidden code cells, Jupyter Book's hidden table of
contents node, ...) and fails on them.  This gives ``singlehtml`` every
``html`` handler it lacks, once all extensions have registered theirs.
"""


def _share_html_handlers(app):
    handlers = app.registry.translation_handlers
    single = handlers.setdefault("singlehtml", {})
    for node, visit_depart in handlers.get("html", {}).items():
        single.setdefault(node, visit_depart)


def setup(app):
    app.connect("builder-inited", _share_html_handlers)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
