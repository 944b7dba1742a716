"""Dataset adapters: role normalisation, dropped turns, bad rows skipped with a reason."""
import json

import pytest

from tests._helpers_data import write_jsonl
from modules.data.chat import BadRow, DatasetError, load_rows, row_to_messages


def sg(*turns):
    return {"id": "x", "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_normalise_sharegpt_and_messages():
    row = sg(("gpt", "leftover"), ("human", "hi"), ("chatgpt", "hello"), ("user", "q"), ("bard", "a"),
             ("human", "tail"))
    assert row_to_messages(row) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    msgs = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                         {"role": "assistant", "content": "a"}]}
    assert row_to_messages(msgs, system_prompt="other")[0] == {"role": "system", "content": "S"}
    default_system = row_to_messages(sg(("human", "u"), ("bing", "a")), system_prompt="P")[0]
    assert default_system == {"role": "system", "content": "P"}


@pytest.mark.parametrize("row,reason", [
    ([], "not_an_object"),
    ({"id": 1}, "no_messages_field"),
    (sg(), "empty"),
    (sg(("human", "a"), ("robot", "b")), "unknown_role"),
    ({"conversations": [{"from": "human", "value": 3}]}, "non_string_content"),
    (sg(("human", "a")), "no_assistant_reply"),
    (sg(("gpt", "only")), "no_assistant_reply"),
    (sg(("human", "a"), ("human", "b"), ("gpt", "c")), "not_alternating"),
    (sg(("human", "a"), ("gpt", "  ")), "empty_message"),
    (sg(("human", "a"), ("system", "s"), ("gpt", "c")), "system_not_first"),
])
def test_bad_rows_have_reasons(row, reason):
    with pytest.raises(BadRow) as err:
        row_to_messages(row)
    assert err.value.reason == reason


def test_local_files_keep_row_numbers(tmp_path):
    rows = [sg(("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(6)]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    assert [i for i, _ in load_rows(jsonl, 2, 4)] == [2, 3]
    truncated = tmp_path / "t.json"  # a JSON array cut mid-row, like the embedded ShareGPT file
    truncated.write_text(json.dumps(rows)[:-20])
    got = load_rows(str(truncated), 0, None)
    assert [i for i, _ in got] == [0, 1, 2, 3, 4] and got[4][1] == rows[4]
    with pytest.raises(DatasetError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(DatasetError, match="empty row range"):
        load_rows(jsonl, 5, 5)


def test_embedded_sharegpt_head():
    rows = load_rows(None, 0, 3)
    assert [i for i, _ in rows] == [0, 1, 2] and "conversations" in rows[0][1]


def test_dataset_folder_through_datasets(tmp_path):
    # A local folder of json files goes through `datasets`, the same code path as hub ids (ultrachat, ...).
    from modules.data.chat import count_rows

    folder = tmp_path / "ultrachat_like"
    folder.mkdir()
    rows = [{"prompt": f"q{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                              {"role": "assistant", "content": f"a{i}"}]} for i in range(5)]
    write_jsonl(folder / "train.jsonl", rows)
    got = load_rows(str(folder), 1, 3)
    assert [i for i, _ in got] == [1, 2]
    assert row_to_messages(got[0][1]) == rows[1]["messages"]
    assert count_rows(str(folder)) == 5


def parts(*texts, image=False):
    """An OpenAI-format content list: text parts (and an image part)."""
    content = [{"type": "text", "text": t} for t in texts]
    return content + ([{"type": "image_url", "image_url": {"url": "data:,"}}] if image else [])


def test_openai_text_parts_are_joined():
    row = {"messages": [{"role": "user", "content": parts("look", "here")},
                        {"role": "assistant", "content": parts("ok")}]}
    assert row_to_messages(row) == [{"role": "user", "content": "look\nhere"}, {"role": "assistant", "content": "ok"}]
    mixed = sg(("human", "plain"), ("gpt", "x"))
    mixed["conversations"][1]["value"] = parts("a", "b")
    assert row_to_messages(mixed)[1] == {"role": "assistant", "content": "a\nb"}


@pytest.mark.parametrize("content,reason", [
    (parts("see", image=True), "non_text_content"),
    (["not a part"], "bad_content_part"),
    ([{"type": "text", "text": 5}], "bad_content_part"),
    ({"type": "text", "text": "a dict, not a list"}, "non_string_content"),
    (parts(), "empty_message"),
])
def test_content_parts_that_are_not_text_skip_the_row(content, reason):
    row = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "a"}]}
    with pytest.raises(BadRow) as err:
        row_to_messages(row)
    assert err.value.reason == reason


def test_rows_with_non_text_parts_are_counted_by_reason():
    from modules.data.generation import prompt_rows

    good = {"messages": [{"role": "user", "content": parts("q")}, {"role": "assistant", "content": "a"}]}
    image = {"messages": [{"role": "user", "content": parts("q", image=True)}, {"role": "assistant", "content": "a"}]}
    examples, skipped, _ = prompt_rows([(0, good), (1, image), (2, image), (3, good)], None)
    assert [row_id for row_id, _ in examples] == [0, 3] and skipped == {"non_text_content": 2}


def test_hub_dataset_errors_are_one_line_with_the_cause(monkeypatch):
    import datasets

    def missing(*args, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError("Dataset 'someone/nothing' doesn't exist on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", missing)
    with pytest.raises(DatasetError, match="cannot load dataset 'someone/nothing': Dataset") as err:
        list(load_rows("someone/nothing", 0, 2))
    assert isinstance(err.value.__cause__, datasets.exceptions.DatasetNotFoundError)
