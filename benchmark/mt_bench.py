"""MT-bench style prompt files: one JSON object a line with a list of user `turns`.

The second turn is asked after the model's own first answer, as EAGLE's evaluation does, so a
conversation is built turn by turn: `conversation(turns[:i+1], answers[:i])`.
"""
import json
from pathlib import Path


class QuestionFileError(ValueError):
    pass


def load_questions(path, num_questions=None):
    """[{'question_id', 'category', 'turns': [str, ...]}]; malformed rows are skipped and counted.

    Returns (questions, skipped) where skipped maps a reason to a count.
    """
    path = Path(path)
    if not path.is_file():
        raise QuestionFileError(f"{path}: question file not found")
    questions, skipped = [], {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped["not JSON"] = skipped.get("not JSON", 0) + 1
            continue
        turns = row.get("turns") if isinstance(row, dict) else None
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            skipped["no usable 'turns'"] = skipped.get("no usable 'turns'", 0) + 1
            continue
        questions.append({"question_id": row.get("question_id", lineno), "category": row.get("category", ""),
                          "turns": turns})
        if num_questions is not None and len(questions) >= num_questions:
            break
    if not questions:
        raise QuestionFileError(f"{path}: no usable question (each line needs a JSON object with a list 'turns')")
    return questions, skipped


def conversation(user_turns, answers):
    """Chat messages for the next turn: user/assistant alternating, ending on a user turn."""
    assert len(answers) == len(user_turns) - 1
    messages = []
    for i, text in enumerate(user_turns):
        messages.append({"role": "user", "content": text})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def prompt_ids(tokenizer, messages):
    """Token ids of the chat template with the generation prompt (a plain list of ints)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)
