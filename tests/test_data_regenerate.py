"""Regeneration: replies replaced turn by turn (driver logic with a scripted generator), the cache
resumes, and the embedded target regenerates real replies through LocalGenerator."""
import json

import socket

import pytest

from modules.data.regenerate import (LocalGenerator, OpenAIGenerator, RegenerationError, regenerate_cached,
                                     regenerate_rows)

ROWS = [
    (0, {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "old 1"},
                           {"from": "human", "value": "more"}, {"from": "gpt", "value": "old 2"}]}),
    (1, {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "old"}]}),
    (2, {"conversations": "broken"}),
    (3, {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                           {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}),
]


class Scripted:
    """Replies 'R<n>:<last user text>:<number of turns seen>'; an empty reply for user text 'c'."""

    def __init__(self):
        self.batches = []

    def __call__(self, convs):
        self.batches.append(len(convs))
        return ["" if c[-1]["content"] == "c" else f"R:{c[-1]['content']}:{len(c)}" for c in convs]


def test_turn_by_turn_replacement_and_batching():
    gen = Scripted()
    out = dict(regenerate_rows(ROWS, gen, batch_size=2, progress=False))
    assert out[0]["messages"] == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "R:hi:1"},
        {"role": "user", "content": "more"}, {"role": "assistant", "content": "R:more:3"}]  # saw its own reply
    assert out[1]["messages"][0] == {"role": "system", "content": "be brief"}
    assert out[1]["messages"][-1] == {"role": "assistant", "content": "R:q:2"}
    assert out[2] == ROWS[2][1]  # unparseable rows pass through for the pipeline to count
    assert [m["role"] for m in out[3]["messages"]] == ["user", "assistant"]  # ended at the empty reply
    assert gen.batches == [2, 1, 2]  # turn 0: rows 0,1 | 3 ; turn 1: rows 0,3


def test_cache_resumes_without_regenerating(tmp_path):
    cache = tmp_path / "regenerated.jsonl"
    first = regenerate_cached(ROWS[:2], Scripted(), cache, progress=False)
    with open(cache, "a") as f:
        f.write('{"row_id": 3, "row": {"mess')  # a line cut by a kill
    gen = Scripted()
    again = regenerate_cached(ROWS, gen, cache, progress=False)
    assert again[:2] == first and gen.batches == [1, 1]  # only row 3 was sent (row 2 does not parse)
    assert len([json.loads(x) for x in cache.read_text().splitlines()[-2:]]) == 2


def test_local_generator_on_embedded_target(smollm2):
    model, tokenizer = smollm2
    gen = LocalGenerator(model, tokenizer, temperature=0.8, max_new_tokens=6, seed=1)
    rows = [(0, {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "x"}]}),
            (1, {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "x"},
                              {"role": "user", "content": "Another one?"}, {"role": "assistant", "content": "x"}]})]
    out = dict(regenerate_rows(rows, gen, batch_size=2, progress=False))
    replies = [m["content"] for r in out.values() for m in r["messages"] if m["role"] == "assistant"]
    assert len(replies) == 3 and all(r and r != "x" for r in replies)
    assert "<|im_end|>" not in "".join(replies)


def test_unreachable_server_is_one_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    gen = OpenAIGenerator(f"http://127.0.0.1:{port}/v1", max_new_tokens=4)
    assert gen.url.endswith("/v1/chat/completions")
    with pytest.raises(RegenerationError, match="chat/completions"):
        gen([[{"role": "user", "content": "hi"}]])
