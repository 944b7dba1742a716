"""Loss mask from the tokenizer's own chat template: exactly the assistant replies + end-of-turn token."""
import jinja2
import pytest

from tests._helpers_data import tiny_tokenizer
from modules.data.loss_mask import TemplateError, tokenize_conversation

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": " The capital of France is Paris.\n"},
    {"role": "user", "content": "And 2+2? Write a poem about the sea."},
    {"role": "assistant", "content": "It is 4! The sea is wide and deep and blue."},
]


def trained_spans(ids, mask):
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    return spans + ([cur] if cur else [])


def check_family(tok, messages, end_token):
    ids, mask, truncated = tokenize_conversation(tok, messages)
    assert not truncated
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    spans = trained_spans(ids, mask)
    assert len(spans) == len(replies)
    end_id = tok.convert_tokens_to_ids(end_token)
    for span, reply in zip(spans, replies):
        assert span[-1] == end_id  # the end-of-turn token closing the reply is trained
        assert tok.decode(span[:-1]).strip() == reply.strip()  # and the reply text, nothing else
    # Nothing after the final end-of-turn (e.g. ChatML's trailing newline) is trained.
    last = max(i for i, m in enumerate(mask) if m)
    assert ids[last] == end_id


@pytest.mark.parametrize("family,end_token", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"),
                                              ("llama2", "</s>"), ("mistral", "</s>")])
def test_three_template_families(family, end_token):
    tok = tiny_tokenizer(family)
    check_family(tok, MESSAGES, end_token)
    check_family(tok, MESSAGES[1:3], end_token)  # no system turn (ChatML inserts a default one)


def test_smollm2_template(smollm2):
    _, tok = smollm2
    check_family(tok, MESSAGES, "<|im_end|>")
    check_family(tok, MESSAGES[1:], "<|im_end|>")


def test_truncation_and_missing_template():
    tok = tiny_tokenizer("chatml")
    full, full_mask, _ = tokenize_conversation(tok, MESSAGES)
    ids, mask, truncated = tokenize_conversation(tok, MESSAGES, max_length=10)
    assert truncated and ids == full[:10] and mask == full_mask[:10]
    tok.chat_template = None
    with pytest.raises(TemplateError, match="--chat-template"):
        tokenize_conversation(tok, MESSAGES)


def test_encode_rows_counts_every_skip():
    from modules.data.generation import encode_rows

    tok = tiny_tokenizer("llama2")
    good = {"messages": MESSAGES[1:3]}
    rows = [(0, good), (1, {"conversations": []}), (2, {"messages": [{"role": "user", "content": "x"}]}),
            (3, good)]
    examples, skipped, truncated = encode_rows(tok, rows, max_length=4, system_prompt=None)
    assert examples == [] and truncated == 0  # 4 tokens hold no reply text
    assert skipped == {"empty": 1, "no_assistant_reply": 1, "no_trained_tokens_after_truncation": 2}
    examples, skipped, _ = encode_rows(tok, rows, max_length=None, system_prompt=None)
    assert [e[0] for e in examples] == [0, 3] and sum(skipped.values()) == 2
    # A template that raises (Llama-2 demands alternating roles) is a counted skip, not a crash.
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(TemplateError, match="must alternate") as err:
        tokenize_conversation(tok, MESSAGES)
    assert isinstance(err.value.__cause__, jinja2.TemplateError)  # the template's own error, kept as the cause
    assert encode_rows(tok, rows[:1], None, None)[1] == {"template_error": 1}
