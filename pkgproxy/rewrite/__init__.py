"""Rewriting the documents an index serves so that the links in them lead through pkgproxy.

Pure functions, run in the disk pool once a document has been verified: each reads the
upstream bytes from one file and writes the representation clients are served to
another (a :data:`pkgproxy.families.Rewriter`). One module per document format: PyPI's
simple pages and JSON API (:mod:`.pypi_simple`, over :mod:`.htmldoc`, :mod:`.jsondoc` and
:mod:`.links`), npm packuments (:mod:`.npm_packument`). Nothing here does network I/O or
imports Twisted.
"""
