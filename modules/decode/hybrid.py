"""The hybrid rule: per request and cycle, a prompt-lookup match replaces the draft's tokens.

The trained draft proposes K tokens every cycle. When the context's last n tokens (prompt and generated
tokens alike) also occurred earlier, with n >= `min_match`, the K tokens that followed that occurrence
replace the draft's K tokens; otherwise the draft's stand. Requests decide independently. This is
TensorRT-LLM's `use_sa_spec` rule (a suffix match of at least 4 tokens replaces the neural draft) with
prompt lookup (modules/decode/lookup.py) as the matcher: the longest match from LONGEST_MATCH tokens down
to min_match wins, its most recent occurrence is read. When that occurrence runs into the end of the
context (a loop whose period is shorter than K), the continuation is read on through the tokens just
proposed, i.e. the loop is assumed to go on: the lookup always proposes exactly K tokens.

Pure Python: the same rule runs in our decoder (modules/decode/tree_decoding.py, `hybrid_min_match`) and in
the vLLM plugin (modules/vllm_plugin/), so the two can be compared position by position. Greedy only: the
lookup has no probabilities for speculative sampling to use.
"""
from modules.decode.lookup import PromptLookup

LONGEST_MATCH = 8  # the longest suffix looked up; a longer match is read as one of this length


class HybridLookup:
    """One request's lookup state: the index over its context and the rule's choice each cycle."""

    def __init__(self, num_tokens: int, min_match: int):
        if not 1 <= min_match <= LONGEST_MATCH or num_tokens < 1:
            raise ValueError(f"hybrid lookup: need 1 <= min_match <= {LONGEST_MATCH} and num_tokens >= 1, got "
                             f"min_match {min_match}, num_tokens {num_tokens}")
        self.num_tokens, self.min_match = num_tokens, min_match
        self.index = PromptLookup(num_tokens, max_ngram=LONGEST_MATCH, min_ngram=min_match)

    @property
    def context(self) -> list[int]:
        return self.index.context

    def reset(self, context) -> None:
        self.index.reset(list(context))

    def extend(self, tokens) -> None:
        self.index.extend(tokens)

    def lookup(self) -> list[int] | None:
        """The K tokens that followed the longest earlier match of at least min_match tokens; None without one."""
        n, start = self.index.find()
        if not n:
            return None
        ctx, out = self.context, []
        for j in range(start + n, start + n + self.num_tokens):
            out.append(ctx[j] if j < len(ctx) else out[j - len(ctx)])
        return out

    def select(self, draft_tokens) -> tuple[list[int], bool]:
        """(the K tokens this cycle verifies, whether they are the lookup's)."""
        tokens = self.lookup()
        return (tokens, True) if tokens is not None else (list(draft_tokens), False)
