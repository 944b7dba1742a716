"""modules/decode/lookup.py: prompt-lookup proposals and grafting them onto a draft tree."""
import torch

from modules.decode.lookup import PromptLookup, graft
from modules.decode.tree import ancestor_matrix, chain_tree, greedy_accept, Tree


def brute_force(ctx, num, max_n, min_n):
    for n in range(min(max_n, len(ctx)), min_n - 1, -1):
        suffix = ctx[-n:]
        for s in range(len(ctx) - n - 1, -1, -1):
            if ctx[s:s + n] == suffix:
                return ctx[s + n:s + n + num]
    return []


def test_propose_matches_brute_force_as_context_grows():
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, 6, (300,), generator=g).tolist()
    look = PromptLookup(num_tokens=5, max_ngram=3)
    look.reset(ctx[:10])
    for end in range(10, 300, 7):
        look.extend(ctx[len(look.context):end])
        assert look.propose() == brute_force(ctx[:end], 5, 3, 1), end



def test_longest_ngram_wins_and_no_match_is_empty():
    look = PromptLookup(num_tokens=3, max_ngram=2)
    look.reset([1, 2, 9, 9, 5, 2, 7, 7, 1, 2])
    assert look.propose() == [9, 9, 5]          # "1 2" matched (not the later "2" alone -> 7 7 1)
    look.reset([4, 5, 6])
    assert look.propose() == []


def small_tree():
    # root 10 -> (11 -> 13), (12)
    tokens = torch.tensor([10, 11, 12, 13])
    parents = torch.tensor([-1, 0, 0, 1])
    depths = torch.tensor([0, 1, 1, 2])
    return Tree(tokens, parents, depths, ancestor_matrix(parents, depths), torch.tensor([0., -1., -2., -3.]))


def test_graft_shares_prefix_and_appends_rest():
    tree = graft(small_tree(), [11, 14, 15])
    assert tree.tokens.tolist() == [10, 11, 12, 13, 14, 15]
    assert tree.parents.tolist() == [-1, 0, 0, 1, 1, 4]
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 3]
    assert torch.equal(tree.anc, ancestor_matrix(tree.parents, tree.depths))
    assert graft(small_tree(), [11, 13]).size == 4      # already in the tree: nothing added
    assert graft(small_tree(), []).size == 4


def test_grafted_branch_is_accepted_greedily():
    tree = graft(small_tree(), [20, 21, 22])
    # target's greedy choice after each node: after the root 20, after 20 -> 21, after 21 -> 22, after 22 -> 7
    nxt = torch.full((tree.size,), 99)
    idx = {t: i for i, t in enumerate(tree.tokens.tolist())}
    nxt[0], nxt[idx[20]], nxt[idx[21]], nxt[idx[22]] = 20, 21, 22, 7
    path, bonus = greedy_accept(tree, nxt)
    assert tree.tokens[path].tolist() == [10, 20, 21, 22] and int(bonus) == 7


def test_graft_on_chain_tree_keeps_order_parents_first():
    tree = graft(chain_tree(torch.tensor([1, 2, 3])), [2, 5, 6, 7])
    assert (tree.parents[1:] < torch.arange(1, tree.size)).all()
