"""Stage 4, export: drafts that SGLang, vLLM and the official EAGLE code serve exactly as trained.

    engines.py        the one place that decides each engine convention (architectures, bias, capture ids, ...)
    eagle_export.py   EAGLE-1/2 export
    eagle3_export.py  EAGLE-3 export
Add an engine convention: docs/extending.md.
"""
