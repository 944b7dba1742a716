"""Self-distilled data: the target writes the assistant replies (greedy, or sampled at a temperature)
and every token's feature is kept from the forward that generates it: no second pass over the
conversation (`--replies greedy|sampled` of both generate_data scripts).

Per conversation, turn by turn, with a KV cache:
    prefill  the prompt so far (system + user turn; later: the closing of the last reply + next user
             turn) -> the features of those tokens and the logits of the first reply token
    decode   one token per forward -> that token's feature and the next logits, until an end-of-turn
             token, --max-new-tokens or --max-length
The token that ends a reply (end-of-turn, or the last one allowed) is not fed while decoding: the
chat template writes it into the next prompt, and its feature comes from that next chunk (or from
the short forward over the template's tail after the last reply).

What is stored is exactly what the chat-template path (loss_mask.tokenize_conversation) makes of the
final conversation: before each chunk the conversation so far is rendered and tokenised, and the
cache is cut back to the longest prefix it shares with the tokens fed so far. Normally that is all
of them and each token is run through the target once; a reply that does not re-tokenise to the
generated ids (or a template that rewrites earlier turns) is recomputed from where it differs.
Replies are the decoded text, stripped, as --regenerate writes them; an empty reply ends the
conversation (a row without any reply is skipped as `no_assistant_reply`).

Batching: conversations are taken `reply_batch_size` at a time and run turn by turn in lockstep.
Prompt chunks run one conversation per forward (no padding: SDPA keeps its causal kernel on CPU);
the decode steps run the batch together, caches left-padded to a common length with an attention
mask and per-row position ids; a row leaves the batch as soon as its reply ends. Sampling uses one
torch.Generator per row seeded from (seed, row id), so a resumed run writes the same data.
"""
import hashlib
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from modules.data.chat import BadRow
from modules.data.features import base_model, output_features
from modules.data.loss_mask import TEMPLATE_ERRORS, encode_messages


def stop_ids(model, tokenizer) -> set[int]:
    """Tokens that end a reply: the tokenizer's eos and the target's generation eos ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


def row_seed(seed: int, row_id: int) -> int:
    """The sampling seed of one dataset row: independent of batching, shards and workers."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row_id}".encode()).digest()[:8], "little") >> 1


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation so far followed by the assistant header (what the target sees)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TEMPLATE_ERRORS as err:
        raise BadRow("template_error") from err
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class Conversation:
    """One row while its replies are generated: the tokens fed so far, their cache and features."""
    row_id: int
    messages: list[dict]                # system + turns so far; the replies are the target's
    users: list[str]                    # the dataset's user turns, in order
    generator: torch.Generator | None   # per-row sampling state (None: greedy)
    ids: list[int] = field(default_factory=list)     # fed tokens: kv and features exist for these
    kv: list | None = None              # per layer (keys, values), [1, heads, len(ids), head_dim]
    last: list = field(default_factory=list)         # feature chunks [n, H] (device of the LM head)
    aux: list = field(default_factory=list)          # fused-feature chunks [n, k*H]
    reply: list[int] = field(default_factory=list)   # tokens generated in the current turn
    pending: int | None = None          # the sampled token not fed yet
    open: bool = True                   # more turns to generate
    forwarded: int = 0                  # tokens run through the target (recomputed ones count again)

    def crop(self, n: int) -> None:
        """Keep the first n fed tokens (cache and features)."""
        if n == len(self.ids):
            return
        self.ids = self.ids[:n]
        self.kv = [(k[:, :, :n], v[:, :, :n]) for k, v in self.kv] if n else None
        self.last = [torch.cat(self.last)[:n]] if self.last else []
        self.aux = [torch.cat(self.aux)[:n]] if self.aux else []


class SelfDistiller:
    """Generates the replies of a list of conversations and returns them with their features.
    mode greedy or sampled (at temperature > 0); generation.check_reply_settings vets the settings."""

    def __init__(self, model, tokenizer, max_length: int, mode: str = "greedy", temperature: float = 0.8,
                 max_new_tokens: int = 512, seed: int = 0, batch_size: int = 8, aux_layers=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_length, self.mode, self.temperature = max_length, mode, temperature
        self.max_new_tokens, self.seed, self.batch_size = max_new_tokens, seed, batch_size
        self.aux_layers = aux_layers
        self.stop = stop_ids(model, tokenizer)
        self.device = next(model.parameters()).device
        self.head = model.get_output_embeddings()
        self.forwarded = 0  # tokens run through the target, over all calls

    # ------------------------------------------------------------------------- forwards
    def _forward(self, input_ids, cache, attention_mask=None, position_ids=None):
        """(last, aux, next-token logits [B, V]) of one chunk after `cache` (a DynamicCache, grown
        in place). New tokens are never padded: padding sits only in the cache, left of each row."""
        out = base_model(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                     past_key_values=cache, use_cache=True,
                                     output_hidden_states=bool(self.aux_layers), return_dict=True)
        last, aux = output_features(self.model, out, self.aux_layers)
        logits = self.head(last[:, -1].to(self.head.weight.device)).float()
        self.forwarded += input_ids.numel()
        return last, aux, logits

    def _feed_one(self, conv: Conversation, ids: list[int]) -> torch.Tensor:
        """Run `ids` after conv's cache (one conversation, no padding); return the next-token logits."""
        cache = DynamicCache(ddp_cache_data=conv.kv) if conv.kv else DynamicCache()
        last, aux, logits = self._forward(torch.tensor([ids], device=self.device), cache)
        conv.kv = [(layer.keys, layer.values) for layer in cache.layers]
        conv.ids += ids
        conv.forwarded += len(ids)
        conv.last.append(last[0])
        if aux is not None:
            conv.aux.append(aux[0])
        return logits[0]

    def _sync(self, conv: Conversation, target: list[int], keep_one: bool) -> torch.Tensor | None:
        """Make conv's fed tokens equal `target`: cut back to the shared prefix, run the rest.
        keep_one: at least one token is run (its logits start the next reply)."""
        p = common_prefix(conv.ids, target)
        if keep_one:
            p = min(p, len(target) - 1)
        conv.crop(p)
        return self._feed_one(conv, target[p:]) if len(target) > p else None

    def _pick(self, logits: torch.Tensor, convs: list[Conversation]) -> list[int]:
        if self.mode == "greedy":
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / self.temperature, dim=-1)
        return [int(torch.multinomial(probs[b], 1, generator=c.generator)) for b, c in enumerate(convs)]

    def _ends_reply(self, conv: Conversation, token: int) -> bool:
        """Whether `token` (just sampled, not fed) is the last of this reply; records it."""
        conv.reply.append(token)
        conv.pending = token
        return (token in self.stop or len(conv.reply) >= self.max_new_tokens
                or len(conv.ids) + 1 >= self.max_length)

    # ------------------------------------------------------------------------- one turn of a batch
    def _decode(self, convs: list[Conversation]) -> None:
        """Feed each row's pending token in lockstep until every reply has ended."""
        if not convs:
            return
        lengths = [len(c.ids) for c in convs]
        width = max(lengths)
        kv = []
        for layer in range(len(convs[0].kv)):
            k0, v0 = convs[0].kv[layer]
            k = k0.new_zeros((len(convs), k0.shape[1], width, k0.shape[3]))
            v = v0.new_zeros((len(convs), v0.shape[1], width, v0.shape[3]))
            for b, c in enumerate(convs):  # left padding: every cache ends at the same column
                k[b, :, width - lengths[b]:] = c.kv[layer][0][0]
                v[b, :, width - lengths[b]:] = c.kv[layer][1][0]
            kv.append((k, v))
        cache = DynamicCache(ddp_cache_data=kv)
        del kv
        mask = torch.zeros((len(convs), width), dtype=torch.long, device=self.device)
        for b, n in enumerate(lengths):
            mask[b, width - n:] = 1
        while convs:
            mask = torch.cat([mask, mask.new_ones((len(convs), 1))], dim=1)
            input_ids = torch.tensor([[c.pending] for c in convs], device=self.device)
            positions = torch.tensor([[len(c.ids)] for c in convs], device=self.device)
            last, aux, logits = self._forward(input_ids, cache, mask, positions)
            for b, c in enumerate(convs):
                c.ids.append(c.pending)
                c.forwarded += 1
                c.last.append(last[b])
                if aux is not None:
                    c.aux.append(aux[b])
            keep = []
            for b, (c, token) in enumerate(zip(convs, self._pick(logits, convs))):
                if self._ends_reply(c, token):  # leaves the batch with its own (unpadded) cache
                    n = len(c.ids)
                    c.kv = [(layer.keys[b:b + 1, :, -n:].clone(), layer.values[b:b + 1, :, -n:].clone())
                            for layer in cache.layers]
                else:
                    keep.append(b)
            if keep and len(keep) < len(convs):
                idx = torch.tensor(keep, dtype=torch.long, device=self.device)
                cache.batch_select_indices(idx)
                mask = mask.index_select(0, idx)
            convs = [convs[b] for b in keep]

    def _turn(self, convs: list[Conversation]) -> None:
        """One reply for every open conversation of a batch."""
        decoding = []
        for c in convs:
            turn = sum(m["role"] == "assistant" for m in c.messages)
            try:
                prompt = prompt_ids(self.tokenizer, c.messages + [{"role": "user", "content": c.users[turn]}])
            except BadRow:  # the template fails on this turn: the conversation ends before it
                c.open = False
                continue
            if len(prompt) >= self.max_length:  # no room for a reply: the conversation ends before this turn
                c.open = False
                continue
            c.reply = []
            logits = self._sync(c, prompt, keep_one=True)
            if not self._ends_reply(c, self._pick(logits[None], [c])[0]):
                decoding.append(c)
        self._decode(decoding)
        for c in convs:
            if not c.open:
                continue
            turn = sum(m["role"] == "assistant" for m in c.messages)
            text = self.tokenizer.decode(c.reply, skip_special_tokens=True).strip()
            if not text:  # an empty reply ends the conversation (as --regenerate does)
                c.open = False
                continue
            c.messages += [{"role": "user", "content": c.users[turn]}, {"role": "assistant", "content": text}]
            full = len(c.ids) + 1 >= self.max_length  # the rest would be truncated away
            c.open = turn + 1 < len(c.users) and not full

    def _finish(self, conv: Conversation, store_dtype) -> dict | str:
        """The stored conversation (ids and mask of the chat-template path), or a skip reason."""
        if not any(m["role"] == "assistant" for m in conv.messages):
            return "no_assistant_reply"
        try:
            ids, mask, truncated = encode_messages(self.tokenizer, conv.messages, self.max_length)
        except BadRow as bad:
            return bad.reason
        self._sync(conv, ids, keep_one=False)
        assert conv.ids == ids, "fed tokens differ from the chat-template tokens"  # _sync makes them equal
        out = {"row_id": conv.row_id, "input_ids": torch.tensor(ids, dtype=torch.int32),
               "loss_mask": torch.tensor(mask, dtype=torch.uint8),
               "hidden_states": torch.cat(conv.last).to("cpu", store_dtype), "truncated": truncated,
               "messages": conv.messages, "forwarded": conv.forwarded}
        if conv.aux:
            out["aux_hidden_states"] = torch.cat(conv.aux).to("cpu", store_dtype)
        return out

    # ------------------------------------------------------------------------- public
    @torch.no_grad()
    def __call__(self, examples, store_dtype=torch.bfloat16, on_batch=None) -> list[dict | str]:
        """examples [(row_id, messages)] (the dataset's messages: only system and user turns are
        used) -> per example, in order: a conversation ready for storage ({row_id, input_ids,
        loss_mask, hidden_states, [aux_hidden_states], truncated, messages, forwarded}) or the
        reason it is skipped."""
        results = []
        for i in range(0, len(examples), self.batch_size):
            convs = []
            for row_id, messages in examples[i:i + self.batch_size]:
                gen = None
                if self.mode == "sampled":
                    gen = torch.Generator(device=self.head.weight.device)  # where the logits are
                    gen.manual_seed(row_seed(self.seed, row_id))
                convs.append(Conversation(row_id, [m for m in messages if m["role"] == "system"],
                                          [m["content"] for m in messages if m["role"] == "user"], gen))
            while any(c.open for c in convs):
                self._turn([c for c in convs if c.open])
            done = [self._finish(c, store_dtype) for c in convs]
            results += done
            if on_batch is not None:
                on_batch(sum(len(d["input_ids"]) for d in done if isinstance(d, dict)))
        return results
