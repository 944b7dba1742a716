"""Tree building, tree attention masks over the KV cache, compaction, acceptance rules."""
import pytest
import torch
from tests._helpers_decode import one_thread  # noqa: F401 (autouse fixture)
from tests._helpers_eagle import tiny_target

from modules.decode.sampling import sample_accept
from modules.decode.tree import CandidatePool, MaskBuffer, Tree, ancestor_matrix, chain_tree, greedy_accept
from modules.kv_cache import TreeKVCache


def naive_anc(parents):
    n = len(parents)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j != -1:
            anc[i, j] = True
            j = parents[j]
    return anc


def random_pool(depth=4, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = CandidatePool(depth, k, "cpu")
    pool.reset(torch.tensor(7))
    front = pool.add(torch.arange(k), torch.zeros(k, dtype=torch.long), -torch.rand(k, generator=g), 1)
    for d in range(2, depth + 1):
        parent = front[torch.randperm(front.numel(), generator=g)[:k]]
        scores = pool.scores[parent].unsqueeze(1) - torch.rand(k, k, generator=g)
        front = pool.add(torch.arange(k * k).reshape(k, k), parent.unsqueeze(1).expand(k, k), scores, d)
    return pool


@pytest.mark.parametrize("total", [1, 5, 12, 100])
def test_rerank_keeps_a_tree_of_the_best_nodes(total):
    pool = random_pool()
    tree = pool.select(total)
    n = min(total, pool.count)
    assert tree.size == n and tree.tokens[0] == 7 and tree.parents[0] == -1
    assert (tree.parents[1:] >= 0).all() and (tree.parents[1:] < torch.arange(1, n)).all()
    assert torch.equal(tree.anc, naive_anc(tree.parents.tolist()))
    assert (tree.depths[1:] == tree.depths[tree.parents[1:]] + 1).all()
    # The kept non-root scores are the best ones of the pool.
    best = torch.sort(pool.scores[1:pool.count], descending=True).values[: n - 1]
    assert torch.equal(torch.sort(tree.scores[1:], descending=True).values, best)


def test_greedy_accept_picks_longest_matching_path():
    # root 0 -> a(1) -> c(3) -> e(5); root -> b(2) -> d(4)
    parents = torch.tensor([-1, 0, 0, 1, 2, 3])
    depths = torch.tensor([0, 1, 1, 2, 2, 3])
    tokens = torch.tensor([10, 11, 12, 13, 14, 15])
    tree = Tree(tokens, parents, depths, ancestor_matrix(parents, depths))
    # target after root says 12 (node 2), after node 2 says 14 (node 4), after node 4 says 99.
    nxt = torch.tensor([12, 13, 14, 15, 99, 0])
    path, bonus = greedy_accept(tree, nxt)
    assert path.tolist() == [0, 2, 4] and int(bonus) == 99
    # Target disagrees with every child of the root: only the root, bonus = its choice.
    nxt = torch.tensor([50, 13, 14, 15, 99, 0])
    path, bonus = greedy_accept(tree, nxt)
    assert path.tolist() == [0] and int(bonus) == 50
    # Correct node under a wrong parent does not count.
    nxt = torch.tensor([11, 42, 14, 15, 99, 0])
    path, bonus = greedy_accept(tree, nxt)
    assert path.tolist() == [0, 1] and int(bonus) == 42


def _tree_logits_vs_sequential(attn):
    torch.manual_seed(0)
    model = tiny_target("llama").double()
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    base, head = model.model, model.lm_head
    prompt = torch.randint(0, 300, (1, 9))
    parents = torch.tensor([-1, 0, 0, 1, 1, 2, 3])
    depths = torch.tensor([0, 1, 1, 2, 2, 2, 3])
    tokens = torch.randint(0, 300, (7,))
    anc = ancestor_matrix(parents, depths)
    cache = TreeKVCache(2, 64)
    base(prompt, past_key_values=cache, use_cache=True)
    dtype = torch.bool if attn == "sdpa" else torch.float64
    mask = MaskBuffer(16, 64, "cpu", dtype).tree(9, anc)
    out = base(tokens[None], attention_mask=mask, position_ids=(9 + depths)[None], past_key_values=cache,
               use_cache=True).last_hidden_state
    tree_logits = head(out[0])
    for i in range(7):
        branch = tokens[anc[i].nonzero().squeeze(1)]
        seq = torch.cat([prompt[0], branch])[None]
        ref = model(seq).logits[0, -1]
        # eager attention takes its softmax in float32 even for a float64 model
        assert torch.allclose(tree_logits[i], ref, atol=1e-9 if attn == "sdpa" else 1e-6), (attn, i)
    return model, cache, prompt, tokens, anc


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_mask_logits_match_sequential_branches(attn):
    _tree_logits_vs_sequential(attn)


def test_kv_compaction_keeps_the_accepted_path():
    model, cache, prompt, tokens, anc = _tree_logits_vs_sequential("sdpa")
    path = anc[6].nonzero().squeeze(1)  # root -> 1 -> 3 -> 6
    cache.compact(9, path)
    assert cache.get_seq_length() == 9 + 4
    # Next token after the path, from the compacted cache, equals a fresh full forward.
    nxt = torch.tensor([[5]])
    out = model(nxt, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[13]])).logits[0, -1]
    ref = model(torch.cat([prompt[0], tokens[path], nxt[0]])[None]).logits[0, -1]
    assert torch.allclose(out, ref, atol=1e-9)
    cache.truncate(10)
    assert cache.get_seq_length() == 10 and cache.layers[1].keys.shape[-2] == 10


def _first_two_tokens(tree, probs, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        path, bonus = sample_accept(tree, probs, g)
        first = tree.tokens[path[1]] if len(path) > 1 else bonus
        out.append(int(first))
    return torch.bincount(torch.tensor(out), minlength=probs.shape[1]).float()


def chi2_pvalue(counts, probs):
    n = counts.sum()
    expected = probs * n
    keep = expected > 5
    stat = (((counts - expected) ** 2) / expected.clamp_min(1e-12))[keep].sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


def test_sample_accept_keeps_the_target_distribution():
    # Root with 3 children; the draft's candidates include a likely, an unlikely and a zero token.
    V = 6
    parents = torch.tensor([-1, 0, 0, 0, 1])
    depths = torch.tensor([0, 1, 1, 1, 2])
    tokens = torch.tensor([0, 2, 5, 3, 1])
    tree = Tree(tokens, parents, depths, ancestor_matrix(parents, depths))
    probs = torch.tensor([[0.1, 0.2, 0.4, 0.0, 0.25, 0.05]] * 5)
    probs[1] = torch.tensor([0.05, 0.5, 0.1, 0.15, 0.1, 0.1])  # after token 2
    counts = _first_two_tokens(tree, probs, 6000, seed=1)
    assert counts[3] == 0  # a zero-probability candidate is never emitted
    assert chi2_pvalue(counts, probs[0]) > 1e-3
    # Second token given that the first was 2 (drawn through node 1's child or its residual).
    g = torch.Generator().manual_seed(2)
    seconds = []
    for _ in range(6000):
        path, bonus = sample_accept(tree, probs, g)
        if len(path) > 1 and int(tree.tokens[path[1]]) == 2:
            seconds.append(int(tree.tokens[path[2]]) if len(path) > 2 else int(bonus))
    c2 = torch.bincount(torch.tensor(seconds), minlength=V).float()
    assert chi2_pvalue(c2, probs[1]) > 1e-3
    # A deliberately wrong rule (always accept the first child) is detected by the same test.
    wrong = torch.zeros(V)
    wrong[2] = 6000
    assert chi2_pvalue(wrong, probs[0]) < 1e-6


def test_chain_tree_is_a_path():
    tree = chain_tree(torch.tensor([4, 5, 6]))
    assert tree.anc.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
