"""Sphinx configuration for the Kapow! documentation."""

project = "Kapow!"
author = "The Kapow! authors"
copyright = "2026, The Kapow! authors"
extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_title = "Kapow! on Twisted"
