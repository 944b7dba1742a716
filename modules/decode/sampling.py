"""Speculative sampling along a draft tree that keeps the target's distribution exactly.

The tree's tokens are chosen deterministically from the draft (top-k of its log-probabilities),
so each proposal is a point mass q = delta_x. Rejection sampling with a point mass accepts x with
probability min(1, p(x) / q(x)) = p(x); after a rejection the residual (p - q)+ is p with x set
to zero, renormalised. Trying the children of a node one after another against the running
residual and, when all are rejected, sampling the bonus token from what is left draws exactly from
p (the argument of SpecInfer / EAGLE's multi-candidate sampling, with deterministic candidates).
Along an accepted child the walk continues with the target's distribution at that child.
"""
import torch


def probs_from_logits(logits, temperature):
    """Target next-token distribution at `temperature` (> 0), in float32."""
    return torch.softmax(logits.float() / temperature, dim=-1)


def sample_accept(tree, probs, generator=None):
    """Walk the tree from the root with speculative sampling.

    probs [N, V]: the target's distribution after each tree node. Returns (path [L] tree indices
    starting with the root, bonus token drawn from the residual at the path's end).
    The loop is over the accepted path (at most depth steps) and the children tried there.
    """
    parents = tree.parents.tolist()
    tokens = tree.tokens.tolist()
    children = [[] for _ in parents]
    for i in range(1, len(parents)):
        children[parents[i]].append(i)  # creation order = best draft score first within a level
    node, path = 0, [0]
    while True:
        p = probs[node]
        residual = None
        accepted = None
        for c in children[node]:
            q = p if residual is None else residual
            x = tokens[c]
            u = torch.rand((), generator=generator, device=p.device)
            if u < q[x]:
                accepted = c
                break
            residual = q.clone() if residual is None else residual
            residual[x] = 0.0
            residual = residual / residual.sum()
        if accepted is None:
            final = p if residual is None else residual
            bonus = torch.multinomial(final, 1, generator=generator)[0]
            return torch.tensor(path, device=tree.tokens.device), bonus
        path.append(accepted)
        node = accepted
