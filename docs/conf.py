"""Sphinx configuration: the API reference from the numpydoc docstrings (napoleon), the theory and
the guides from Markdown (myst-parser). Build: ``python -m sphinx -W -b html docs docs/_build/html``."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("MPLBACKEND", "Agg")

import ufm  # noqa: E402

project = "ufm"
author = "the ufm authors"
release = version = ufm.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
root_doc = "index"
html_theme = "alabaster"

# numpydoc sections; attributes and parameters as field lists (one entry per name)
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings state shapes and types; signatures stay readable
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
# Parameter types such as "(n, p)" become cross-references to every attribute named n or p; those
# ambiguous targets are not errors in the docstrings.
suppress_warnings = ["ref.python"]


def _escape_bars(app, what, name, obj, options, lines):
    """The docstrings write norms and absolute values as |x| and ||x||, which reStructuredText reads
    as substitutions: escape every bar."""
    lines[:] = [line.replace("|", "\\|") for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _escape_bars)
