"""The vLLM plugin's logic without vLLM (modules/vllm_plugin/): the rule applied to a runner's batch, per request,
the draft's proposals recorded before the rule, and the version pin. The real engine runs it in
tests/test_vllm_hybrid.py and tests/test_export_vllm_serving.py (make test-vllm)."""
import sys
import types

import numpy as np
import pytest
import torch

from modules.decode.hybrid import HybridLookup
from modules.decode.proposals import context_key, read_proposals
from modules.vllm_plugin import hybrid_runner
from modules.vllm_plugin.hybrid_runner import PLACEHOLDER, AfterDraft, HybridRequests, ProposalRecorder

K, VOCAB = 3, 100


def fake_runner(rows, greedy, discard=()):
    """A stand-in for vLLM's runner: rows = [(request id, tokens known before this step)]."""
    tokens = np.zeros((len(rows), 64), dtype=np.int32)
    for i, (_, known) in enumerate(rows):
        tokens[i, :len(known)] = known
    batch = types.SimpleNamespace(req_ids=[r for r, _ in rows], greedy_reqs=set(greedy), vocab_size=VOCAB,
                                  num_tokens_no_spec=np.array([len(k) for _, k in rows]), token_ids_cpu=tokens)
    mask = np.array([r in discard for r, _ in rows])
    return types.SimpleNamespace(input_batch=batch, discard_request_mask=types.SimpleNamespace(np=mask))


def test_each_request_follows_the_rule_on_its_own_context():
    loop, fresh, sampled_req, prefill = [5, 6, 7, 8, 5, 6], [10, 11, 12, 13], [5, 6, 7, 5], [5, 6, 5]
    runner = fake_runner([("loop", loop), ("fresh", fresh), ("sampled", sampled_req), ("prefill", prefill)],
                         greedy={"loop", "fresh", "prefill"}, discard={"prefill"})
    drafts = torch.full((4, K), 99, dtype=torch.int32)
    # this step's tokens: "loop" accepted 7 then the bonus 8; the rest only a bonus (PLACEHOLDER = rejected slots)
    sampled = torch.tensor([[7, 8, PLACEHOLDER, PLACEHOLDER], [14, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER],
                            [6, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER], [1, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]])
    hybrid = HybridRequests(min_match=2)
    after = AfterDraft(hybrid)
    out = after(runner, drafts, sampled)
    want = HybridLookup(K, 2)
    want.reset(loop + [7, 8])
    assert out[0].tolist() == want.lookup() == [5, 6, 7]   # "7 8" seen before: the lookup replaces the draft
    assert out[1].tolist() == [99] * K                      # no match: the draft's tokens stand
    assert out[2].tolist() == [99] * K                      # a sampling request keeps the draft (would match)
    assert out[3].tolist() == [99] * K                      # still in prefill: untouched
    assert hybrid.lookups["loop"].context == loop + [7, 8] and set(hybrid.lookups) == {"loop", "fresh"}
    assert (hybrid.steps, hybrid.replaced) == (2, 1)

    # next step: "fresh" finished (gone from the batch), "loop" goes on from where it was
    runner = fake_runner([("loop", loop + [7, 8])], greedy={"loop"})
    out = after(runner, torch.full((1, K), 99, dtype=torch.int32), torch.tensor([[5, 6, 9, PLACEHOLDER]]))
    want.extend([5, 6, 9])
    assert set(hybrid.lookups) == {"loop"} and hybrid.lookups["loop"].context == want.context
    assert out[0].tolist() == (want.lookup() or [99] * K)


def test_the_corrupting_control_shifts_every_lookup_token():
    runner = fake_runner([("loop", [5, 6, 7, 8, 5, 6])], greedy={"loop"})
    out = AfterDraft(HybridRequests(2, corrupt=True))(runner, torch.zeros((1, K), dtype=torch.int32),
                                                      torch.tensor([[7, PLACEHOLDER]]))
    assert out[0].tolist() == [9, 6, 7]  # the lookup [8, 5, 6], each + 1


def test_the_drafts_own_proposals_are_recorded_by_context_before_the_rule(tmp_path):
    loop, fresh, sampled_req = [5, 6, 7, 8, 5, 6], [10, 11, 12, 13], [5, 6, 7, 5]
    runner = fake_runner([("loop", loop), ("fresh", fresh), ("sampled", sampled_req)], greedy={"loop", "fresh"})
    drafts = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=torch.int32)
    sampled = torch.tensor([[7, 8, PLACEHOLDER, PLACEHOLDER], [14, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER],
                            [6, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]])
    log = tmp_path / "proposals.jsonl"
    after = AfterDraft(HybridRequests(min_match=2), ProposalRecorder(log))
    out = after(runner, drafts, sampled)
    assert out[0].tolist() == [5, 6, 7]                     # the rule replaced the first row's draft ...
    want = {context_key(loop + [7, 8]): [1, 2, 3], context_key(fresh + [14]): [4, 5, 6]}
    assert read_proposals(log) == want                      # ... but the draft's own tokens were recorded
    # the next step: "loop" goes on (its key grows with its context), "fresh" finished
    runner = fake_runner([("loop", loop + [7, 8])], greedy={"loop"})
    after(runner, torch.tensor([[3, 3, 3]], dtype=torch.int32), torch.tensor([[5, 9, PLACEHOLDER, PLACEHOLDER]]))
    want[context_key(loop + [7, 8, 5, 9])] = [3, 3, 3]
    assert read_proposals(log) == want
    assert set(after.recorder.keys) == {"loop"}


def test_recording_is_off_without_the_variable_and_works_without_the_hybrid_field(tmp_path, monkeypatch):
    runner = types.SimpleNamespace(speculative_config=types.SimpleNamespace(model=str(tmp_path / "no-such-export")))
    monkeypatch.delenv(hybrid_runner.RECORD_ENV, raising=False)
    assert hybrid_runner.after_draft_of(runner) is None     # nothing to do: the drafts pass untouched
    log = tmp_path / "proposals.jsonl"
    monkeypatch.setenv(hybrid_runner.RECORD_ENV, str(log))
    runner = types.SimpleNamespace(**vars(fake_runner([("a", [1, 2, 3])], greedy={"a"})),
                                   speculative_config=runner.speculative_config)
    after = hybrid_runner.after_draft_of(runner)
    assert after.hybrid is None and after.recorder is not None
    after(runner, torch.tensor([[4, 5, 6]]), torch.tensor([[9, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER]]))
    assert read_proposals(log) == {context_key([1, 2, 3, 9]): [4, 5, 6]}


def test_other_vllm_versions_are_refused_in_one_line(monkeypatch):
    from modules import vllm_plugin

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(__version__="0.33.1"))
    with pytest.raises(RuntimeError, match=r"needs vLLM 0\.32\.x, this is vLLM 0\.33\.1") as err:
        vllm_plugin.register()
    assert "\n" not in str(err.value)
