"""Hybrid trees: prompt-lookup candidates grafted onto the EAGLE draft tree as extra branches.

Prompt lookup (n-gram speculation) proposes the tokens that followed the most recent earlier
occurrence of the context's last n tokens. It costs no draft forward, and it is strong exactly where
a small draft is weak: code and edits that repeat the prompt. `graft` merges such a chain into the
draft tree: the chain walks down the tree while its tokens match existing children (those nodes are
shared) and continues as a new branch where they stop matching. The target verifies the whole
tree in the same single forward, so the extra branch costs only its extra tree tokens, and greedy
acceptance (modules/decode/tree.py) stays exact: siblings still hold distinct tokens.

Greedy decoding only: speculative sampling needs the proposal's probability of every candidate,
which a lookup does not have.
"""
import torch

from modules.decode.tree import Tree


class PromptLookup:
    """Prompt-lookup proposals over a growing context, O(1) per token.

    For each n in [min_ngram, max_ngram] an index maps every n-gram that already has a following
    token to its most recent start, so `propose()` is a few dict lookups, whatever the context length.
    """

    def __init__(self, num_tokens: int, max_ngram: int = 3, min_ngram: int = 1):
        if num_tokens < 1 or min_ngram < 1 or max_ngram < min_ngram:
            raise ValueError(f"need num_tokens >= 1 and 1 <= min_ngram <= max_ngram, got {num_tokens}, "
                             f"{min_ngram}, {max_ngram}")
        self.num_tokens, self.max_ngram, self.min_ngram = num_tokens, max_ngram, min_ngram
        self.reset([])

    def reset(self, context: list[int]) -> None:
        self.context = []
        self.index = {n: {} for n in range(self.min_ngram, self.max_ngram + 1)}
        self.extend(context)

    def extend(self, tokens: list[int]) -> None:
        ctx = self.context
        for tok in tokens:
            ctx.append(int(tok))
            p = len(ctx) - 1  # the n-grams ending just before p now have a follower
            for n, index in self.index.items():
                if p - n >= 0:
                    index[tuple(ctx[p - n:p])] = p - n

    def find(self) -> tuple[int, int]:
        """(n, start): the context's last n tokens also occur at `start` (the most recent earlier
        occurrence), longest n first; (0, -1) when nothing matches."""
        ctx = self.context
        for n in range(min(self.max_ngram, len(ctx)), self.min_ngram - 1, -1):
            start = self.index[n].get(tuple(ctx[-n:]))
            if start is not None:
                return n, start
        return 0, -1

    def propose(self) -> list[int]:
        """Up to num_tokens tokens that followed the most recent earlier match of the context's
        last n tokens, longest n first; [] when nothing matches."""
        n, start = self.find()
        return self.context[start + n:start + n + self.num_tokens] if n else []


def graft(tree: Tree, chain: list[int]) -> Tree:
    """The tree with `chain` (tokens after the root) merged in as a branch from the root.

    Shared prefixes reuse existing nodes; the remainder becomes new nodes appended at the end (parents
    still come before children). Returns the same tree when the chain adds nothing."""
    if not chain:
        return tree
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()  # one host read each, per cycle
    node, i = 0, 0
    children = {}
    for idx in range(1, len(tokens)):
        children[(parents[idx], tokens[idx])] = idx
    while i < len(chain) and (node, chain[i]) in children:
        node = children[(node, chain[i])]
        i += 1
    rest = chain[i:]
    if not rest:
        return tree
    n, m = len(tokens), len(rest)
    device = tree.tokens.device
    new_tokens = torch.tensor(rest, dtype=tree.tokens.dtype, device=device)
    new_parents = torch.tensor([node] + list(range(n, n + m - 1)), dtype=tree.parents.dtype, device=device)
    new_depths = tree.depths[node] + torch.arange(1, m + 1, dtype=tree.depths.dtype, device=device)
    anc = torch.zeros(n + m, n + m, dtype=torch.bool, device=device)
    anc[:n, :n] = tree.anc
    anc[n:, :n] = tree.anc[node]                       # the new branch sees the path to its attach point
    anc[n:, n:] = torch.ones(m, m, dtype=torch.bool, device=device).tril()
    scores = None
    if tree.scores is not None:  # lookup nodes have no draft log-prob
        scores = torch.cat([tree.scores, torch.full((m,), float("nan"), dtype=tree.scores.dtype, device=device)])
    return Tree(torch.cat([tree.tokens, new_tokens]), torch.cat([tree.parents, new_parents]),
                torch.cat([tree.depths, new_depths]), anc, scores)
