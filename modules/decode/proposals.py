"""Proposals step by step: which tokens a draft proposed after which context, to compare two servings of it.

Two implementations that serve the same draft as trained (our decoders and vLLM, say) propose the same tokens
after the same context, whatever either accepted before. So a proposal is keyed by its context: the whole token
list the draft proposed after (prompt + the tokens generated so far, the token the target chose last included),
hashed by `context_key`. Comparing the proposals made after the contexts both sides saw is a far sharper check
than comparing acceptance totals: at the quality of a small test draft a broken export can accept about as much
as the correct one (issue #30), yet it proposes other tokens.

    ContextKey      a context's key, grown token by token (one per request in the vLLM plugin)
    ProposalLog     appends proposals to a JSON-lines file, one line per request and step (the vLLM plugin)
    read_proposals  such a file back as {context key: tokens}
    keyed           a decoder's per-cycle proposals (DecodeResult.proposals) as {context key: tokens}
    agreement       how many of the contexts two sides share got the same first token, the same whole chain

Pure Python (the vLLM plugin imports it in vLLM's engine process).
"""
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

KEY_BYTES = 8  # blake2b digest size: 64 bits, no collision among the ~1e4 contexts a test compares


class ContextKey:
    """The key of a token list, extended as the list grows: the same key as context_key(all tokens so far)."""

    def __init__(self, tokens=()):
        self._hash = hashlib.blake2b(digest_size=KEY_BYTES)
        self.length = 0
        self.extend(tokens)

    def extend(self, tokens) -> None:
        tokens = list(tokens)
        self._hash.update(struct.pack(f"<{len(tokens)}q", *tokens))  # int64 little-endian, token after token
        self.length += len(tokens)

    @property
    def key(self) -> str:
        return self._hash.hexdigest()  # the state goes on: extend() after reading the key is fine


def context_key(tokens) -> str:
    """The key of a context (a list of token ids)."""
    return ContextKey(tokens).key


class ProposalLog:
    """Appends proposals to a JSON-lines file: {"context": key, "n": context length, "tokens": [proposed]} per
    line. The file is opened on the first write and each write is flushed at once (one write call per step), so
    a reader in another process sees every step that has run, and several writers may append to one file."""

    def __init__(self, path):
        self.path = Path(path)
        self._file = None

    def write(self, proposals) -> None:
        """proposals: (context key, context length, tokens) of each request of one step."""
        if not proposals:
            return
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write("".join(json.dumps({"context": k, "n": n, "tokens": t}) + "\n" for k, n, t in proposals))
        self._file.flush()


def read_proposals(path) -> dict[str, list[int]]:
    """{context key: tokens} of a ProposalLog file ({} when there is none); a context logged twice keeps its last
    proposal."""
    path = Path(path)
    if not path.is_file():
        return {}
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {r["context"]: r["tokens"] for r in rows}


def keyed(prompt, tokens, proposals) -> dict[str, list[int]]:
    """{context key: tokens} of one generation: proposals [(context length, tokens proposed)] in the order they
    were made (DecodeResult.proposals), each context a prefix of prompt + tokens (the generated tokens)."""
    context = list(prompt) + list(tokens)
    key, out = ContextKey(), {}
    for n, proposed in proposals:
        if n < key.length or n > len(context):
            raise ValueError(f"a proposal after {n} tokens: contexts must grow, within the {len(context)} tokens")
        key.extend(context[key.length:n])
        out[key.key] = list(proposed)
    return out


@dataclass
class Agreement:
    """Proposals of two sides compared over the contexts both proposed after."""
    shared: int      # contexts both sides proposed after
    first: int       # ... where the first proposed token is the same
    chains: int      # ... where the whole proposal (every token, the same length) is the same
    ours: int        # contexts the first side proposed after
    theirs: int      # ... the second side

    @property
    def first_share(self) -> float:
        return self.first / self.shared if self.shared else 0.0

    @property
    def chain_share(self) -> float:
        return self.chains / self.shared if self.shared else 0.0

    @property
    def coverage(self) -> float:
        """The share of the first side's contexts the second side also proposed after."""
        return self.shared / self.ours if self.ours else 0.0

    def __str__(self):
        return (f"{self.first}/{self.shared} same first token ({self.first_share:.1%}), {self.chains}/{self.shared} "
                f"same chain ({self.chain_share:.1%}) over {self.shared} shared contexts (of {self.ours} and "
                f"{self.theirs})")


def agreement(ours: dict, theirs: dict) -> Agreement:
    """Compare two {context key: tokens} maps on the contexts they share."""
    shared = ours.keys() & theirs.keys()
    return Agreement(shared=len(shared), first=sum(ours[k][:1] == theirs[k][:1] for k in shared),
                     chains=sum(ours[k] == theirs[k] for k in shared), ours=len(ours), theirs=len(theirs))
