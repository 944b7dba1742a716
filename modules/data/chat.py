"""Chat datasets -> `messages` lists ([{"role": "system"|"user"|"assistant", "content": str}]).

Sources (`--dataset`):
  sharegpt            the embedded ShareGPT V3 file (truncated mid-row: parsed incrementally)
  ultrachat           HuggingFaceH4/ultrachat_200k (split train_sft) through `datasets`
  a .json/.jsonl file rows of {"messages": [...]} or ShareGPT {"conversations": [{"from", "value"}]}; a
                      message's content is a string or a list of OpenAI text parts (joined)
  a folder / hub id   the same row shapes through `datasets` (json or parquet files)
Rows are addressed by their index in the source, so a row range means the same rows everywhere.
Bad rows raise `BadRow(reason)`; the generator skips and counts them per reason.
"""
import json
from pathlib import Path

from modules.paths import EMBEDDED_DATASET_NAME, embedded_sharegpt

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "assistant": "assistant", "model": "assistant",
    "system": "system",
}
HUB_ALIASES = {"ultrachat": ("HuggingFaceH4/ultrachat_200k", "train_sft")}


class BadRow(ValueError):
    """A dataset row that cannot become a conversation; `reason` is a short counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DatasetError(RuntimeError):
    """A dataset that cannot be read at all (one-line message for users)."""


# ----------------------------------------------------------------------------- rows -> messages

def message_text(content) -> str:
    """A message's text: a string, or the OpenAI list of parts ([{"type": "text", "text": ...}, ...]) with its
    text parts joined by newlines (as vLLM renders them). A part that is not text (an image, audio, ...)
    makes the row unusable for a text target: BadRow("non_text_content")."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRow("non_string_content")
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise BadRow("bad_content_part")
        if part.get("type") != "text":
            raise BadRow("non_text_content")
        if not isinstance(part.get("text"), str):
            raise BadRow("bad_content_part")
        texts.append(part["text"])
    return "\n".join(texts)


def row_to_messages(row, system_prompt: str | None = None) -> list[dict]:
    """Normalise one row (messages or ShareGPT shape) into alternating user/assistant turns.

    A leading assistant turn (continuation of a split conversation) is dropped, as is a trailing
    user turn (it has no reply to train on). `system_prompt` is prepended when the row has none.
    """
    if not isinstance(row, dict):
        raise BadRow("not_an_object")
    if "__bad_json__" in row:
        raise BadRow("bad_json")
    turns = row.get("messages", row.get("conversations"))
    if turns is None:
        raise BadRow("no_messages_field")
    if not isinstance(turns, list):
        raise BadRow("messages_not_a_list")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRow("turn_not_an_object")
        role = turn.get("role", turn.get("from"))
        content = turn.get("content", turn.get("value"))
        if not isinstance(role, str) or role.lower() not in ROLE_ALIASES:
            raise BadRow("unknown_role")
        messages.append({"role": ROLE_ALIASES[role.lower()], "content": message_text(content)})
    if not messages:
        raise BadRow("empty")

    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    if any(m["role"] == "system" for m in rest):
        raise BadRow("system_not_first")
    while rest and rest[0]["role"] == "assistant":
        rest = rest[1:]
    if rest and rest[-1]["role"] == "user":
        rest = rest[:-1]
    if not rest:
        raise BadRow("no_assistant_reply")
    for i, m in enumerate(rest):
        if m["role"] != ("user" if i % 2 == 0 else "assistant"):
            raise BadRow("not_alternating")
        if not m["content"].strip():
            raise BadRow("empty_message")
    if not system and system_prompt:
        system = [{"role": "system", "content": system_prompt}]
    return system + rest


# ----------------------------------------------------------------------------- sources

def iter_json_array(path: Path):
    """Rows of a JSON array file, parsed one at a time; stops quietly at a truncated tail."""
    decoder = json.JSONDecoder()
    text = path.read_text(encoding="utf-8")
    pos = text.find("[")
    if pos < 0:
        raise DatasetError(f"{path}: not a JSON array")
    pos += 1
    n = len(text)
    while True:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the embedded ShareGPT file ends mid-row: keep the complete rows only
        yield row


def iter_jsonl(path: Path):
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield {"__bad_json__": line_no}  # counted as a bad row, keeps row numbering


def dataset_display_name(dataset: str | None) -> str:
    return dataset or EMBEDDED_DATASET_NAME


def _local_rows(path: Path):
    if path.suffix == ".jsonl":
        return iter_jsonl(path)
    with path.open(encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        return iter_json_array(path)
    return iter_jsonl(path)  # a .json file holding one object per line


def load_rows(dataset: str | None, start: int = 0, end: int | None = None,
              split: str | None = None) -> list[tuple[int, object]]:
    """[(row_id, raw_row)] for rows start..end-1 of a dataset (end None: to the end)."""
    if start < 0 or (end is not None and end <= start):
        raise DatasetError(f"empty row range: start={start} end={end}")
    name = dataset_display_name(dataset)
    if name == EMBEDDED_DATASET_NAME:
        rows = iter_json_array(embedded_sharegpt())
    elif Path(name).expanduser().is_file():
        rows = _local_rows(Path(name).expanduser())
    elif Path(name).expanduser().is_dir():  # a local dataset folder (json/parquet files): through `datasets`
        return list(_hub_rows(str(Path(name).expanduser()), split, start, end))
    elif name.endswith((".json", ".jsonl")) or name.startswith((".", "/", "~")):
        raise DatasetError(f"dataset file not found: {name}")
    else:
        rows = _hub_rows(name, split, start, end)
        return list(rows)
    out = []
    for i, row in enumerate(rows):
        if end is not None and i >= end:
            break
        if i >= start:
            out.append((i, row))
    return out


def _hub_rows(name: str, split: str | None, start: int, end: int | None):
    ds = _load_hub_dataset(name, split)
    stop = len(ds) if end is None else min(end, len(ds))
    for i in range(start, stop):
        yield i, ds[i]


def count_rows(dataset: str | None, split: str | None = None) -> int:
    """Number of rows of a dataset (for splitting "to the end" over workers)."""
    name = dataset_display_name(dataset)
    if name == EMBEDDED_DATASET_NAME or Path(name).expanduser().is_file():
        return sum(1 for _ in load_rows(dataset, 0, None))
    return len(_load_hub_dataset(name, split))


def _load_hub_dataset(name: str, split: str | None):
    """A hub dataset (or a short name of HUB_ALIASES); what a user can fix is a DatasetError, cause kept."""
    import datasets

    hub_id, default_split = HUB_ALIASES.get(name, (name, "train"))
    try:
        return datasets.load_dataset(hub_id, split=split or default_split)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:  # not found, no network, bad split
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DatasetError(f"cannot load dataset '{name}': {first}") from err
