"""Stage 4, export: drafts that SGLang, vLLM and the official EAGLE code serve exactly as trained.

    engines.py        the one place that decides each engine convention (architectures, bias, capture ids, ...);
                      a leaf (imports only torch): every layer may use it
Each kind's export code lives with its kind (modules/draft/eagle_draft.py export_draft,
modules/draft/eagle3_draft.py export_eagle3) and writes through engines.py.
Add an engine convention: docs/extending.md.
"""
