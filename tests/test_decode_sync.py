"""The tree decoder waits for the device (torch.cuda.synchronize) only when timing is asked for."""
import torch

from modules.decode import tree_decoding
from modules.draft.eagle_draft import EagleDraft
from modules.decode.tree_decoding import EagleDecoder
from tests._helpers_eagle import tiny_target


def decode(timing, monkeypatch):
    """(result, number of synchronize calls) of one generation on a tiny random pair."""
    calls = []
    monkeypatch.setattr(tree_decoding, "synchronize", lambda device: calls.append(device))
    target = tiny_target("llama", seed=0).double()
    torch.manual_seed(1)
    draft = EagleDraft.from_target(target).double().eval()
    prompt = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(3))
    res = EagleDecoder(target, draft, total_tokens=8, depth=3, top_k=2, timing=timing).generate(prompt, 12)
    return res, len(calls)


def test_no_synchronize_without_timing(monkeypatch):
    res, n_sync = decode(False, monkeypatch)
    assert n_sync == 0
    assert res.draft_s == res.target_s == res.cycles_s == res.prefill_s == 0.0 and res.total_s > 0
    timed, n_sync_timed = decode(True, monkeypatch)
    assert n_sync_timed >= 2 * timed.cycles > 0  # at least before and after each timed forward
    assert timed.tokens == res.tokens
    assert timed.draft_s > 0 and timed.target_s > 0 and timed.cycles_s >= timed.draft_s + timed.target_s


def test_synchronize_waits_for_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    tree_decoding.synchronize(torch.device("cpu"))
    assert calls == []
    tree_decoding.synchronize(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_host_reads_per_cycle_do_not_grow_with_the_tree_depth():
    """The ops that would block the host on a GPU (counted on CPU): 3 a cycle, the accepted path and
    its tokens, at any tree depth (the ancestor matrix is built without reading the levels on the host)."""
    from tests.test_training_host_syncs import CountSyncs

    target = tiny_target("llama", seed=0)
    torch.manual_seed(1)
    draft = EagleDraft.from_target(target).eval()
    prompt = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(3))
    for depth in (2, 6):
        with CountSyncs() as c:
            res = EagleDecoder(target, draft, total_tokens=24, depth=depth, top_k=3).generate(prompt, 16)
        assert c.count <= 3 * len(res.accept_lengths) + 1, (depth, c.ops)  # + 1: the prefill's token
