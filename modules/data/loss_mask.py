"""Token ids and the loss mask of a conversation, derived from the tokenizer's own chat template.

No per-model header strings: the template is rendered twice, once with the real assistant replies
and once with each reply replaced by a unique sentinel. The sentinel render splits the text into
template pieces (headers, user turns, separators) around each reply; walking the real render with
those pieces gives every reply's exact character span, whatever the headers look like (ChatML,
Llama-3, Llama-2/Mistral [INST], templates that trim content or move the system prompt).

What is trained (mask 1): the tokens of each assistant reply plus the end-of-turn special token that
closes it (<|im_end|>, <|eot_id|>, </s>): the draft must predict it so that the speculative
decoder proposes the end of a reply. Everything else (system prompt, user text, role headers, the
newline after the end-of-turn token, padding) is 0.
"""
import re

from jinja2 import TemplateError as JinjaTemplateError

from modules.data.chat import BadRow

# Private-use code points: never produced by tokenizers' normalisers or chat templates.
SENTINEL = "\ue000{}\ue001"
SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class TemplateError(RuntimeError):
    """The tokenizer's chat template cannot produce a loss mask (one-line message for users)."""


# What rendering a chat template raises on a conversation it rejects: the template's own
# raise_exception('Conversation roles must alternate ...') and undefined names (jinja2), or Python
# errors of its expressions on unexpected content (a list, None, a missing key).
TEMPLATE_ERRORS = (JinjaTemplateError, TypeError, ValueError, KeyError, IndexError)


def render(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template: pass --chat-template FILE (a Jinja template)")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except TEMPLATE_ERRORS as err:
        message = str(err).strip()
        raise TemplateError(f"chat template failed: {message.splitlines()[0] if message else repr(err)}") from err


def reply_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int, int]]]:
    """(rendered text, [(reply_start, reply_end, piece_end)]) character spans of each assistant reply.

    piece_end is where the template text that follows the reply ends (the next reply or the end):
    the end-of-turn token is searched for in [reply_end, piece_end).
    """
    text = render(tokenizer, messages)
    skeleton_msgs = [dict(m, content=SENTINEL.format(i)) if m["role"] == "assistant" else m
                     for i, m in enumerate(messages)]
    skeleton = render(tokenizer, skeleton_msgs)
    pieces = SENTINEL_RE.split(skeleton)  # [piece0, id0, piece1, id1, ..., pieceN]
    template_pieces, reply_ids = pieces[0::2], [int(i) for i in pieces[1::2]]
    spans, pos = [], 0
    for k, msg_id in enumerate(reply_ids):
        before, after = template_pieces[k], template_pieces[k + 1]
        if not text.startswith(before, pos):
            raise TemplateError("chat template renders differently around assistant replies (cannot locate them)")
        pos += len(before)
        content = messages[msg_id]["content"]
        # Templates may trim replies; the template piece that follows must match right after it.
        for shown in dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())):
            if text.startswith(shown, pos) and text.startswith(after, pos + len(shown)):
                spans.append((pos, pos + len(shown), pos + len(shown) + len(after)))
                pos += len(shown)
                break
        else:
            raise TemplateError(f"cannot find assistant reply {msg_id} in the rendered chat template")
    if pos + len(template_pieces[-1]) != len(text):
        raise TemplateError("chat template render does not match its sentinel render")
    return text, spans


def end_of_turn_ids(tokenizer) -> set[int]:
    """Ids of special/added control tokens (eos, <|im_end|>, <|eot_id|>, ...)."""
    ids = set(tokenizer.all_special_ids)
    for tok_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(tok_id))
    return ids


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None = None):
    """(input_ids list[int], loss_mask list[int], truncated: bool) for one conversation."""
    text, spans = reply_spans(tokenizer, messages)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as err:
        raise TemplateError("the tokenizer gives no character offsets: "
                            "a fast (tokenizers) tokenizer is needed") from err
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    specials = end_of_turn_ids(tokenizer)
    mask = [0] * len(ids)
    t = 0
    for start, end, piece_end in spans:
        # Tokens overlapping the reply text are trained.
        while t < len(ids) and offsets[t][1] <= start:
            t += 1
        while t < len(ids) and offsets[t][0] < end:
            if offsets[t][1] > start:
                mask[t] = 1
            t += 1
        # Then the template text after the reply up to and including its first control token.
        u = t
        while u < len(ids) and offsets[u][0] < piece_end:
            if ids[u] in specials:
                for v in range(t, u + 1):
                    mask[v] = 1
                t = u + 1
                break
            u += 1
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask, truncated


def encode_messages(tokenizer, messages: list[dict], max_length: int):
    """(ids, mask, truncated) of one conversation, or BadRow(reason) when it has nothing to train on
    or the template fails on it (a missing template is an error of the whole run)."""
    try:
        ids, mask, was_truncated = tokenize_conversation(tokenizer, messages, max_length)
    except TemplateError as err:
        if "no chat template" in str(err):
            raise
        raise BadRow("template_error") from err
    if not any(mask):
        raise BadRow("no_trained_tokens_after_truncation" if was_truncated else "no_trained_tokens")
    return ids, mask, was_truncated
