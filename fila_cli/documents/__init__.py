"""Documents in, page images out: opening PDFs and images safely, choosing pages, rendering them.

- ``document``: ``open_document`` (one-line errors for bad files), text layers, page specs.
- ``page_select``: which pages to read for a question (BM25 over the text layers).
- ``canvas``: where a page lands on its anyres canvas (sizes only).
- ``render``: a page rendered at the zoom that fills its canvas.
- ``page_geometry``: a page's points, its render's pixels and its canvas, and the crops a box touches.
- ``page_words``, ``answer_match``, ``evidence``: where an answer is on a page (text layer or OCR),
  and whether a crop boundary cuts it.

Imports only ``fila_cli.config``/``errors`` and PyMuPDF, Pillow, numpy: never torch, so the
isolated document worker stays light.
"""
