"""Thin command-line scripts: flags -> Settings -> library call -> JSON."""
