"""EAGLE-2 dynamic draft trees: growing, reranking, attention masks, greedy acceptance.

A tree is a set of token sequences sharing a root (the token the target already chose). Node 0 is
the root; every other node has a parent with a smaller index, so ancestors always come before
descendants (compaction and mask building rely on it). `anc[i, j]` is True when node j is node i
or one of its ancestors: it is both the tree attention mask (node i may attend to node j) and the
path of node i.

Growing (EAGLE-2, Li et al. 2024): depth 1 holds the draft's top_k tokens after the root. At each
further depth the top_k nodes of the newest level, ranked by cumulative draft log-probability, are
expanded into top_k children each. At the end every candidate is reranked by its cumulative
log-probability and the best `total_tokens - 1` are kept with the root. A child's score never
exceeds its parent's (log-probs are <= 0) and a stable sort puts the earlier-created parent first
on ties, so the kept set is closed under ancestors: it is a tree.
"""
from dataclasses import dataclass

import torch


@dataclass
class Tree:
    tokens: torch.Tensor   # [N] target token ids, tokens[0] = root
    parents: torch.Tensor  # [N] parent index, -1 for the root
    depths: torch.Tensor   # [N] 0 for the root
    anc: torch.Tensor      # [N, N] bool, ancestor-or-self
    scores: torch.Tensor = None  # [N] cumulative draft log-prob (root 0), when known

    @property
    def size(self):
        return self.tokens.shape[0]


class CandidatePool:
    """The candidates one drafting round produces, in creation order (parents first).

    Preallocated for `1 + top_k + (depth - 1) * top_k**2` entries; entry 0 is the root.
    """

    def __init__(self, depth, top_k, device):
        self.capacity = 1 + top_k + max(depth - 1, 0) * top_k * top_k
        self.tokens = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.parents = torch.full((self.capacity,), -1, dtype=torch.long, device=device)
        self.scores = torch.zeros(self.capacity, dtype=torch.float32, device=device)
        self.depths = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.eye = torch.eye(top_k, dtype=torch.bool, device=device)  # siblings see only themselves
        self.count = 1

    def reset(self, root_token):
        self.tokens[0] = root_token
        self.scores[0] = 0.0
        self.count = 1

    def add(self, tokens, parents, scores, depth):
        """Append a level; returns the indices the new candidates got."""
        n = tokens.numel()
        idx = torch.arange(self.count, self.count + n, device=self.tokens.device)
        self.tokens[self.count:self.count + n] = tokens.reshape(-1)
        self.parents[self.count:self.count + n] = parents.reshape(-1)
        self.scores[self.count:self.count + n] = scores.reshape(-1)
        self.depths[self.count:self.count + n] = depth
        self.count += n
        return idx

    def select(self, total_tokens):
        """Rerank: keep the root and the `total_tokens - 1` best candidates, as a Tree."""
        n = self.count
        keep_n = min(total_tokens, n)
        scores = self.scores[:n].clone()
        scores[0] = float("inf")  # the root is always kept
        order = torch.sort(scores, descending=True, stable=True).indices[:keep_n]
        keep = torch.sort(order).values  # creation order again: parents before children
        # Map candidate index -> tree index (the parent of a kept node is kept, see module doc).
        remap = torch.full((n,), -1, dtype=torch.long, device=keep.device)
        remap[keep] = torch.arange(keep_n, device=keep.device)
        parents = self.parents[keep].clone()
        parents[1:] = remap[parents[1:]]
        depths = self.depths[keep]
        return Tree(self.tokens[keep], parents, depths, ancestor_matrix(parents, depths), self.scores[keep])


def ancestor_matrix(parents, depths):
    """[N, N] bool ancestor-or-self matrix: the transitive closure of "is my parent" by repeated squaring,
    ceil(log2 N) small matmuls whose count depends on N alone, so building it never waits for the GPU
    (a level-by-level build reads each level's nodes on the host: one sync a level)."""
    n = parents.shape[0]
    anc = torch.eye(n, dtype=torch.bool, device=parents.device)
    if n > 1:
        anc[torch.arange(1, n, device=parents.device), parents[1:]] = True
    reach = 1
    while reach < n - 1:  # anc holds the ancestors up to `reach` levels up
        a = anc.float()
        anc = (a @ a) > 0
        reach *= 2
    return anc


def chain_tree(tokens):
    """A single path (for tests and for depth-limited trees near the context end)."""
    n = tokens.shape[0]
    parents = torch.arange(-1, n - 1, device=tokens.device)
    depths = torch.arange(n, device=tokens.device)
    return Tree(tokens, parents, depths, ancestor_matrix(parents, depths))


def greedy_accept(tree, target_next):
    """Longest path whose every token equals the target's greedy choice after its parent.

    target_next [N]: the target's argmax token after each node. Returns (path [L] tree indices
    starting with the root, bonus token = the target's choice after the path's last node).
    Siblings hold distinct tokens, so at most one child of a node matches: the deepest
    fully-matching node is unique.
    """
    correct = torch.ones_like(tree.tokens, dtype=torch.bool)
    correct[1:] = tree.tokens[1:] == target_next[tree.parents[1:]]
    # A node is accepted when it and all its ancestors are correct.
    accepted = ~(tree.anc & ~correct.unsqueeze(0)).any(dim=1)
    best = torch.argmax(torch.where(accepted, tree.depths, -1))
    path = tree.anc[best].nonzero().squeeze(1)  # ancestors in index order = depth order (a host read)
    return path, target_next.index_select(0, best.view(1)).squeeze(0)  # indexing by a 0-d tensor would sync


class MaskBuffer:
    """Preallocated 4D attention masks [1, 1, q, past + q] for tree and causal steps.

    `kind` is 'bool' (True = attend; sdpa) or an additive float dtype (eager attention).
    The returned mask is a view into the buffer: use it before the next call.
    """

    def __init__(self, max_q, max_kv, device, dtype=torch.bool):
        self.dtype = dtype
        self.buf = torch.zeros(max_q, max_kv, dtype=torch.bool, device=device)
        self.causal = torch.ones(max_q, max_q, dtype=torch.bool, device=device).tril()

    def _finish(self, q, kv):
        m = self.buf[:q, :kv].unsqueeze(0).unsqueeze(0)
        if self.dtype == torch.bool:
            return m
        return torch.zeros(m.shape, dtype=self.dtype, device=m.device).masked_fill(~m, torch.finfo(self.dtype).min)

    def tree(self, past, anc, extra=None):
        """Rows of `anc` attend to the `past` cached positions and to their tree ancestors.

        extra: optional [q, e] bool block placed between the past and the new tokens (the draft
        uses it for the tree slots it has already cached this round).
        """
        q = anc.shape[0]
        e = 0 if extra is None else extra.shape[1]
        self.buf[:q, :past] = True
        if extra is not None:
            self.buf[:q, past:past + e] = extra
        self.buf[:q, past + e:past + e + q] = anc
        return self._finish(q, past + e + q)

    def causal_after(self, past, q):
        """Plain causal mask for q new tokens after `past` cached ones."""
        self.buf[:q, :past] = True
        self.buf[:q, past:past + q] = self.causal[:q, :q]
        return self._finish(q, past + q)
