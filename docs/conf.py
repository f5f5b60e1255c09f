"""Sphinx configuration (offline-safe: no intersphinx, notebooks are not executed)."""

project = "sams-scvi"
author = "sams_scvi developers"
extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_autodoc_typehints",
    "sphinx_copybutton",
]
autosummary_generate = True
napoleon_numpy_docstring = True
nb_execution_mode = "off"
html_theme = "sphinx_book_theme"
exclude_patterns = ["_build"]
