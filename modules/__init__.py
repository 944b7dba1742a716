"""Shared code of the EAGLE draft-training scripts, grouped by pipeline stage.

    settings.py        settings defined once: dataclass fields -> flags, --help, --config FILE, run_config.json
    io.py              the bottom layer: atomic writes (temp + rename), safetensors helpers (docs/extending.md#layers)
    paths.py           where things live: repo root, the embedded default model, dataset and prompts
    target.py          load the target (hub id, local folder, GGUF) ; target_weights.py: embedding + head only
    placement.py       which device each model and rank uses (the one rule)
    cpu_linear.py      fp32 linear layers on CPU through oneDNN with pre-packed weights (targets and drafts)
    kv_cache.py        TreeKVCache: the decoders' KV cache (preallocated buffers, in-place compaction)
    data/              stage 1: chat rows -> token ids, loss mask, target features -> shards
    draft/             stage 2: the draft architectures and their registry (draft/kinds.py)
    training/          stage 2: the Trainer subclasses and their config dataclasses
    decode/            stage 3: lossless tree speculative decoding
    export/            stage 4: engine conventions and exports for SGLang / vLLM / official EAGLE
    vllm_plugin/       loaded by vLLM 0.32 itself: the hybrid proposer (draft + prompt lookup), the export check
    stages.py          run a pipeline stage (a script) once, skipped on rerun: demo.py, learning curve
    demo_report.py     the `make demo` report

Why subpackages rather than one flat folder: a newcomer adding a dataset format, a draft kind or an
engine rule opens one folder (data/, draft/, export/) and its __init__ lists what each file holds.
What every stage needs (paths, target, placement) stays at the top. Scripts at the top level and in
train/ and benchmark/ stay thin and import from here.
"""
