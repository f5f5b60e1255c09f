"""Sphinx configuration: built offline (no intersphinx) with warnings as errors; notebooks keep stored outputs."""

from importlib.metadata import version as _version

project = "sams-scvi"
author = "sams_scvi developers"
copyright = "2026, sams_scvi developers"
release = _version("sams-scvi")
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "tutorials/README.md"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

autosummary_generate = True
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = True
typehints_defaults = "braces"

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# The tutorials are executed by `make tutorials` and stored with their outputs; the site renders them as stored.
nb_execution_mode = "off"
nb_merge_streams = True

html_theme = "sphinx_book_theme"
html_title = "sams-scvi"
html_theme_options = {"repository_url": "https://github.com/sams-scvi/sams-scvi", "use_repository_button": True}


def _citation_key(name, rawtext, text, lineno, inliner, options=None, content=None):
    """``:cite:p:`key``` in inherited scvi-tools docstrings, shown as the key (no bibliography offline)."""
    from docutils import nodes

    return [nodes.literal(rawtext, text)], []


def setup(app):
    """The ``cite`` roles of inherited scvi-tools docstrings (sphinxcontrib-bibtex's), as a domain of their own."""
    from sphinx.domains import Domain

    class CitationKeys(Domain):
        name = "cite"
        label = "citation keys"
        roles = {"p": _citation_key, "t": _citation_key}

        def resolve_any_xref(self, env, fromdocname, builder, target, node, contnode):
            return []  # citation keys are never cross-reference targets

    app.add_domain(CitationKeys)
