"""Lossless EAGLE-2 tree speculative decoding over a Hugging Face causal LM (batch size 1).

One cycle, with n tokens already in the target's KV cache and the root token x_n chosen:
  1. draft: grow a dynamic tree after x_n (modules/decode/tree.py), `depth - 1` batched draft forwards
     over a tree attention mask, on top of the draft's own KV cache of the accepted context;
  2. verify: ONE target forward over the tree tokens, with a 4D tree mask and tree position ids
     (n + depth) on top of the target's KV cache;
  3. accept the longest path the target agrees with (greedy) or walk the tree with speculative
     sampling (temperature > 0, modules/decode/sampling.py); the target's choice after the path is the
     bonus token, the next root;
  4. compact: keep the KV entries of the accepted path in the target cache (gather), drop the rest;
     drop the draft's tree entries and feed it the accepted tokens with the target's real features
     (its "catch-up" forward, whose last output starts the next tree).

The decoder talks to a draft through its kind's adapter (`kind.tree_adapter(draft)`, modules/draft/kinds.py),
the protocol `DraftAdapter` of modules/draft/adapter.py; `make_adapter` accepts a draft or an adapter.
"""
import time
from dataclasses import dataclass, field

import torch

from modules.draft.adapter import DraftAdapter
from modules.draft.kinds import kind_of
from modules.kv_cache import TreeKVCache
from modules.placement import output_device
from modules.decode.sampling import probs_from_logits, sample_accept
from modules.decode.hybrid import HybridLookup
from modules.decode.lookup import PromptLookup, graft
from modules.decode.tree import CandidatePool, MaskBuffer, chain_tree, greedy_accept


def make_adapter(draft):
    """A DraftAdapter for `draft`: itself if it is one, else its kind's (modules/draft/kinds.py)."""
    if isinstance(draft, DraftAdapter):
        return draft
    return kind_of(draft).tree_adapter(draft)


def draft_kind(draft):
    """The kind of a draft, or of an adapter's draft (modules/draft/kinds.py): what decides its capabilities.
    None for an adapter of no registered draft (a test's oracle)."""
    model = draft.draft if isinstance(draft, DraftAdapter) else draft
    return None if model is None else kind_of(model)


# ---- the decoder --------------------------------------------------------------------------

def synchronize(device):
    """Wait for the work queued on `device` (for timing only: a sync stalls the GPU's queue)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class DecodeResult:
    tokens: list                  # new token ids (prompt excluded), EOS included when hit
    accept_lengths: list = field(default_factory=list)  # per cycle: accepted draft tokens + 1 bonus
    from_lookup: list = field(default_factory=list)     # per cycle: the hybrid rule verified the lookup's tokens
    # per cycle the draft proposed: (context length, prompt included, [its chain]), when the decoder records them
    # (record_proposals=True; a lookup cycle of the hybrid rule has none); modules/decode/proposals.py keys them
    proposals: list | None = None
    # prefill_s .. cycles_s are measured only by a decoder built with timing=True (else 0)
    prefill_s: float = 0.0
    draft_s: float = 0.0          # draft forwards + log-probs inside cycles
    target_s: float = 0.0         # target verify forwards + lm_head inside cycles
    cycles_s: float = 0.0         # wall time of all cycles
    total_s: float = 0.0

    @property
    def cycles(self):
        return len(self.accept_lengths)

    @property
    def tau(self):
        """Mean tokens per draft-verify cycle, the bonus token included."""
        return sum(self.accept_lengths) / max(len(self.accept_lengths), 1)

    @property
    def overhead_s(self):
        """Decoder time outside target and draft forwards (tree building, acceptance, caches)."""
        return self.cycles_s - self.draft_s - self.target_s


@dataclass
class _Buffers:
    """What one generate() call allocates up front, sized for its prompt and max_new_tokens."""
    tcache: TreeKVCache            # the target's KV cache
    dcache: TreeKVCache            # the draft's KV cache
    tmask: MaskBuffer              # the target's tree attention masks
    dmask: MaskBuffer              # the draft's causal and tree attention masks
    pool: CandidatePool            # the nodes of the tree being drafted
    slot_anc: torch.Tensor         # [k*depth, k*depth] bool: ancestry of the draft's tree slots


def eos_set(eos_token_id):
    """None, an id or a list of ids -> a set of ints."""
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, int) else {int(e) for e in eos_token_id}


def extend_until_stop(tokens, new, eos, max_new):
    """Append the ids `new` to `tokens`, up to and including the first EOS or the max_new-th token.
    True when one of those stops was hit."""
    for i, tok in enumerate(new):
        if tok in eos or len(tokens) + i + 1 >= max_new:
            tokens.extend(new[:i + 1])
            return True
    tokens.extend(new)
    return False


class EagleDecoder:
    """EAGLE-2 dynamic-tree speculative decoding, batch size 1, CPU or CUDA.

    target: a HF causal LM (Llama-like: base model + lm_head; sdpa or eager attention).
    draft: a draft of a registered kind (modules/draft/kinds.py) or a DraftAdapter.
    total_tokens: tree size verified per cycle, root included; depth: draft levels; top_k: nodes
    expanded per level and children per node. temperature 0 = greedy.
    lookup_tokens: > 0 grafts a prompt-lookup branch of up to that many tokens onto every tree (a hybrid
    tree, modules/decode/lookup.py; greedy only), matched on the context's last `lookup_ngram` tokens.
    hybrid_min_match: > 0 applies the hybrid rule (modules/decode/hybrid.py; greedy only): in a cycle where the
    context's last >= hybrid_min_match tokens occurred earlier, the `depth` tokens that followed are verified as
    a chain instead of the draft's tree (no draft forwards that cycle), else the draft's tree is. With a chain
    shape (top_k 1, total_tokens depth + 1) this is what the vLLM plugin serves (modules/vllm_plugin/).
    record_proposals: DecodeResult.proposals lists the draft's chain of every cycle with its context (a chain only,
    top_k 1: a tree is no one proposal), to compare with another serving step by step (modules/decode/proposals.py).
    timing: fill DecodeResult's prefill / draft / target / cycle times. On a GPU this synchronises
    with the device around every forward, so it is off unless a benchmark asks for it; total_s is
    always measured (each cycle ends by reading the accepted tokens on the host anyway).
    """

    def __init__(self, target, draft, total_tokens=16, depth=4, top_k=4, temperature=0.0, timing=False,
                 lookup_tokens=0, lookup_ngram=3, hybrid_min_match=0, record_proposals=False):
        if total_tokens < 1 or depth < 1 or top_k < 1:
            raise ValueError(f"need total_tokens, depth, top_k >= 1, got {total_tokens}, {depth}, {top_k}")
        if lookup_tokens < 0 or lookup_ngram < 1:
            raise ValueError(f"need lookup_tokens >= 0 and lookup_ngram >= 1, got {lookup_tokens}, {lookup_ngram}")
        if (lookup_tokens or hybrid_min_match) and temperature > 0:
            raise ValueError("prompt-lookup tokens (lookup_tokens, hybrid_min_match > 0) need greedy decoding "
                             "(temperature 0): speculative sampling needs every candidate's draft probability")
        if lookup_tokens and hybrid_min_match:
            raise ValueError("lookup_tokens (a lookup branch grafted onto every tree) and hybrid_min_match (the "
                             "lookup replaces the tree) are two ways to combine them: pick one")
        if hybrid_min_match:
            HybridLookup(depth, hybrid_min_match)  # a bad min_match is refused here, not mid-generation
        if record_proposals and top_k != 1:
            raise ValueError(f"record_proposals needs a chain (top_k 1), got top_k {top_k}: a tree is no one proposal")
        self.record_proposals = record_proposals
        self.lookup_tokens, self.lookup_ngram, self.hybrid_min_match = lookup_tokens, lookup_ngram, hybrid_min_match
        self.target = target
        self.adapter = make_adapter(draft)
        self.adapter.check_target(target)
        self.config = target.config.get_text_config()
        impl = getattr(self.config, "_attn_implementation", "sdpa") or "sdpa"
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"tree verification needs sdpa or eager attention, target uses '{impl}'")
        for name in ("final_logit_softcapping", "logit_scale"):
            if getattr(self.config, name, None) not in (None, 1.0):
                raise ValueError(f"targets with {name} are not supported by the tree decoder")
        self.base = getattr(target, target.base_model_prefix)
        self.lm_head = target.get_output_embeddings()
        self.device = output_device(target)  # the draft lives here too (modules/placement.py)
        self.target_mask_dtype = torch.bool if impl == "sdpa" else self.lm_head.weight.dtype
        self.total_tokens, self.depth, self.top_k = total_tokens, depth, top_k
        self.temperature = temperature
        self.max_positions = getattr(self.config, "max_position_embeddings", None) or 1 << 30
        self.timing = timing

    def _clock(self):
        """perf_counter after the device's queued work is done; None when not timing (no sync)."""
        if not self.timing:
            return None
        synchronize(self.device)
        return time.perf_counter()

    def _elapsed(self, start):
        return self._clock() - start if self.timing else 0.0

    # -- forwards (timed) --
    def _target(self, ids, position_ids, mask, cache, result=None):
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                        use_cache=True, output_hidden_states=self.adapter.aux_layers is not None)
        # A target spread over GPUs (--spread-target) leaves each layer's output on its own GPU.
        hidden = None if out.hidden_states is None else tuple(h.to(self.device) for h in out.hidden_states)
        return out.last_hidden_state.to(self.device), hidden

    def _draft(self, ids, feats, position_ids, mask, cache, result, last_only=False):
        t = self._clock()
        h = self.adapter.forward(ids, feats, position_ids, mask, cache)
        lp = self.adapter.logprobs(h[:, -1] if last_only else h[0])
        result.draft_s += self._elapsed(t)
        return h, lp

    def _choose(self, logits, generator):
        if self.temperature <= 0:
            return torch.argmax(logits, dim=-1)
        return torch.multinomial(probs_from_logits(logits, self.temperature), 1, generator=generator)[..., 0]

    # -- one tree --
    def _grow_tree(self, root, h_root, lp_root, n, depth, buf, result):
        """Draft a tree after `root` (whose draft output is h_root [H_d], log-probs lp_root [V_d]).

        buf.slot_anc: scratch for the ancestry of the tree slots the draft caches this round."""
        dcache, dmask, pool, slot_anc = buf.dcache, buf.dmask, buf.pool, buf.slot_anc
        k = min(self.top_k, lp_root.shape[-1])
        pool.reset(root)
        top_lp, top_ids = lp_root.topk(k)
        ids = self.adapter.to_target_ids(top_ids)
        front_idx = pool.add(ids, torch.zeros_like(ids), top_lp, 1)
        front_tokens, front_scores = ids, top_lp
        front_h = h_root.unsqueeze(0).expand(k, -1)
        front_slots = torch.arange(k, device=self.device)
        slot_anc.zero_()
        eye = pool.eye[:k, :k]
        for d in range(1, depth):
            # Frontier nodes sit at depth d: draft position n + d - 1, attending to the accepted
            # context, to their ancestors among the slots cached this round, and to themselves.
            start = (d - 1) * k
            q = front_tokens.shape[0]
            slot_anc[front_slots, front_slots] = True
            mask = dmask.tree(n, eye[:q, :q], extra=slot_anc[front_slots, :start])
            pos = torch.full((1, q), n + d - 1, dtype=torch.long, device=self.device)
            h, lp = self._draft(front_tokens.unsqueeze(0), front_h.unsqueeze(0), pos, mask, dcache, result)
            top_lp, top_ids = lp.topk(k, dim=-1)                  # [q, k]
            cum = front_scores.unsqueeze(1) + top_lp               # cumulative log-prob
            ids = self.adapter.to_target_ids(top_ids)
            child_idx = pool.add(ids, front_idx.unsqueeze(1).expand(q, k), cum, d + 1)
            if d == depth - 1:
                break
            best = cum.reshape(-1).topk(min(k, cum.numel())).indices
            parent = best // k
            new_slots = torch.arange(d * k, d * k + best.numel(), device=self.device)
            slot_anc[new_slots] = slot_anc[front_slots[parent]]
            front_idx, front_tokens = child_idx.reshape(-1)[best], ids.reshape(-1)[best]
            front_scores, front_h, front_slots = cum.reshape(-1)[best], h[0, parent], new_slots
        dcache.truncate(n)  # the tree's draft entries are not reused
        return pool.select(self.total_tokens)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=128, eos_token_id=None, generator=None):
        """input_ids: [P] or [1, P] prompt. Returns DecodeResult (tokens = the new tokens).

        Stops at max_new_tokens, at an EOS (kept in the output, as HF generate does), or at the
        target's context length. A prompt that fills the context raises ValueError.
        """
        t0 = time.perf_counter()
        t_prefill = self._clock()
        result = DecodeResult(tokens=[], proposals=[] if self.record_proposals else None)
        ids = self._prompt_ids(input_ids)
        P = ids.shape[1]
        max_new = min(max_new_tokens, self.max_positions - P)
        eos = eos_set(eos_token_id)
        buf = self._buffers(P, max_new)
        root, h, lp = self._prefill(ids, buf, generator, result)
        result.prefill_s = self._elapsed(t_prefill)
        result.draft_s = 0.0
        tokens = [int(root)]
        lookup = self._new_lookup(ids, tokens)
        n = P  # position of the root; the caches hold positions < n
        done = tokens[0] in eos or len(tokens) >= max_new
        while not done:
            t_cycle = self._clock()
            tree_depth = min(self.depth, self.max_positions - 1 - n)
            if tree_depth < 1:
                break
            chain = lookup.lookup() if isinstance(lookup, HybridLookup) else None  # the hybrid rule
            if chain is not None:
                tree = chain_tree(torch.tensor([int(root)] + chain[:tree_depth], device=self.device))
            else:
                tree = self._grow_tree(root, h[0, -1], lp[0], n, tree_depth, buf, result)
                if result.proposals is not None:  # after the prompt and `tokens`, the root included
                    result.proposals.append((P + len(tokens), tree.tokens[1:].tolist()))
            if isinstance(lookup, PromptLookup):  # hybrid tree: the prompt-lookup branch rides in the same verify
                tree = graft(tree, lookup.propose()[:self.max_positions - 1 - n])
            result.from_lookup.append(chain is not None)
            path, bonus, last, hs = self._verify(tree, n, buf, generator, result)
            new = torch.cat([tree.tokens[path[1:]], bonus.view(1)])  # accepted draft tokens + the bonus
            result.accept_lengths.append(new.shape[0])
            done = extend_until_stop(tokens, new.tolist(), eos, max_new)  # the cycle's one host read
            if lookup is not None:
                lookup.extend(tokens[len(lookup.context) - ids.shape[1]:])
            if not done:
                h, lp = self._catch_up(new, path, last, hs, n, buf, result)
                n += new.shape[0]
                root = bonus
            result.cycles_s += self._elapsed(t_cycle)
        result.tokens = tokens
        result.total_s = time.perf_counter() - t0
        return result

    # -- the steps of generate --
    def _prompt_ids(self, input_ids):
        """The prompt as [1, P] long on the decoder's device; ValueError when empty or filling the context."""
        ids = torch.as_tensor(input_ids, device=self.device).reshape(1, -1).long()
        P = ids.shape[1]
        if P == 0:
            raise ValueError("empty prompt")
        if P >= self.max_positions:
            raise ValueError(f"prompt has {P} tokens, the target's context holds {self.max_positions}: "
                             f"no room to generate")
        return ids

    def _new_lookup(self, ids, tokens):
        """The prompt-lookup index over prompt + first token: a PromptLookup for grafted branches, a HybridLookup
        for the hybrid rule, None when neither is on."""
        if self.hybrid_min_match:
            lookup = HybridLookup(self.depth, self.hybrid_min_match)
        elif self.lookup_tokens:
            lookup = PromptLookup(self.lookup_tokens, max_ngram=self.lookup_ngram)
        else:
            return None
        lookup.reset(ids[0].tolist() + tokens)
        return lookup

    def _buffers(self, P, max_new):
        """Caches, masks and tree scratch for a prompt of P tokens and up to max_new new ones."""
        k, depth = self.top_k, self.depth
        tree_cap = 1 + k + max(depth - 1, 0) * k * k
        max_tree = min(self.total_tokens, tree_cap) + self.lookup_tokens
        if self.hybrid_min_match:  # a lookup chain: the root and `depth` tokens
            max_tree = max(max_tree, depth + 1)
        return _Buffers(
            tcache=TreeKVCache(self.config.num_hidden_layers, P + max_new + max_tree + 1),
            dcache=self.adapter.new_cache(P + max_new + k * depth + 1),
            tmask=MaskBuffer(max_tree, P + max_new + max_tree + 1, self.device, self.target_mask_dtype),
            dmask=MaskBuffer(max(P, max_new + 1, k), P + max_new + k * depth + 1, self.device),
            pool=CandidatePool(depth, k, self.device),
            slot_anc=torch.zeros(k * depth, k * depth, dtype=torch.bool, device=self.device))

    def _prefill(self, ids, buf, generator, result):
        """Target over the prompt (causal, HF builds the mask), the first token (the first root), then
        the draft's catch-up over the prompt. Returns (root, draft hidden [1,1,H_d], log-probs [1,V_d])."""
        last, hs = self._target(ids, None, None, buf.tcache)
        feats = self.adapter.target_features(last, hs)
        root = self._choose(self.lm_head(last[:, -1]), generator)[0]
        h, lp = self._draft_context(torch.cat([ids[:, 1:], root.view(1, 1)], 1), feats, 0, buf, result)
        return root, h, lp

    def _verify(self, tree, n, buf, generator, result):
        """One target forward over the tree, then acceptance: the longest agreeing path (greedy) or a
        speculative-sampling walk. Keeps the path's target KV entries. Returns (path node ids, bonus
        token, target last hidden over the tree, its hidden states or None)."""
        t = self._clock()
        mask = buf.tmask.tree(n, tree.anc)
        last, hs = self._target(tree.tokens.unsqueeze(0), (n + tree.depths).unsqueeze(0), mask, buf.tcache)
        logits = self.lm_head(last[0])
        result.target_s += self._elapsed(t)
        if self.temperature <= 0:
            path, bonus = greedy_accept(tree, torch.argmax(logits, dim=-1))
        else:
            path, bonus = sample_accept(tree, probs_from_logits(logits, self.temperature), generator)
        buf.tcache.compact(n, path)
        return path, bonus, last, hs

    def _catch_up(self, new, path, last, hs, n, buf, result):
        """Draft catch-up: the accepted tokens `new` (at positions n..) with the target's real features
        at the path; the last output starts the next tree. Returns (hidden, log-probs)."""
        feats = self.adapter.target_features(last, hs)[:, path]
        return self._draft_context(new.unsqueeze(0), feats, n, buf, result)

    def _draft_context(self, ids, feats, start, buf, result):
        """The draft over accepted context: tokens ids [1, L] at positions start.., each with the target's
        feature; its cache keeps them. Returns (hidden, log-probs) of the last one, which start the next
        tree (modules/decode/parallel.py appends its block of mask slots here)."""
        L = ids.shape[1]
        pos = torch.arange(start, start + L, device=self.device).unsqueeze(0)
        return self._draft(ids, feats, pos, buf.dmask.causal_after(start, L), buf.dcache, result, last_only=True)
