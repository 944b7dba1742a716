"""Target-regenerated training data (EAGLE-3, SpecForge, speculators): every assistant reply of a
conversation is replaced by the target's OWN reply, generated turn by turn on the conversation so
far (the user turns are kept). The draft then learns the target's distribution, not the one of
whoever wrote the dataset.

Two generators with the same call, `gen(list of message lists) -> list of reply strings`:
  LocalGenerator   the loaded target (HF generate, left-padded batches, sampling at `temperature`)
  OpenAIGenerator  an OpenAI-compatible server (SGLang, vLLM, llama-cpp-python) at a base URL,
                   /v1/chat/completions, a few requests in flight at once
`regenerate_rows` drives either over [(row_id, row)] batches of turn i for all conversations, and
`regenerate_cached` keeps the results in a JSONL file so that a killed run resumes (sampling is
random: without the cache a resumed run would write different data). `regenerate_sharded` splits
the rows over the ranks of a distributed job: one file per rank, then every rank reads them all.
"""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib import error, request

import torch
from tqdm.auto import tqdm

from modules.data.chat import BadRow, row_to_messages

DEFAULT_TEMPERATURE = 0.8
DEFAULT_MAX_NEW_TOKENS = 512


class RegenerationError(RuntimeError):
    """A server or setting problem (one-line message for users)."""


class LocalGenerator:
    """Replies from the loaded target with HF generate; prompts longer than max_prompt_tokens get
    an empty reply (the conversation ends there)."""

    def __init__(self, model, tokenizer, temperature=DEFAULT_TEMPERATURE, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                 max_prompt_tokens=2048, seed=0):
        self.model, self.tokenizer = model, tokenizer
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.seed = seed
        self.calls = 0

    @torch.no_grad()
    def __call__(self, conversations):
        tok = self.tokenizer
        prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        keep = [i for i, ids in enumerate(encoded) if len(ids) <= self.max_prompt_tokens]
        replies = [""] * len(conversations)
        if not keep:
            return replies
        device = next(self.model.parameters()).device
        longest = max(len(encoded[i]) for i in keep)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(keep), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(keep):  # left padding: every prompt ends at the same column
            ids[r, longest - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[r, longest - len(encoded[i]):] = 1
        torch.manual_seed(self.seed + self.calls)  # reproducible for a given batch order
        self.calls += 1
        sample = self.temperature > 0
        out = self.model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=self.max_new_tokens,
            do_sample=sample, temperature=self.temperature if sample else None, top_p=1.0 if sample else None,
            top_k=0 if sample else None, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        for r, i in enumerate(keep):
            replies[i] = tok.decode(out[r, longest:], skip_special_tokens=True).strip()
        return replies


class OpenAIGenerator:
    """Replies from an OpenAI-compatible server: POST {base_url}/chat/completions."""

    def __init__(self, base_url, model="default", temperature=DEFAULT_TEMPERATURE,
                 max_new_tokens=DEFAULT_MAX_NEW_TOKENS, api_key=None, concurrency=8, timeout=600):
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.temperature, self.max_new_tokens = model, temperature, max_new_tokens
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY", "none")
        self.concurrency, self.timeout = concurrency, timeout

    def one(self, messages):
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_new_tokens}).encode()
        req = request.Request(self.url, data=body, headers={
            "Content-Type": "application/json", "Authorization": f"Bearer {self.api_key}"})
        try:
            with request.urlopen(req, timeout=self.timeout) as resp:
                data = json.loads(resp.read())
        except error.HTTPError as err:
            detail = err.read()[:200].decode(errors="replace")
            if err.code == 400:  # e.g. the context is longer than the server's window: end this conversation
                return ""
            raise RegenerationError(f"{self.url}: HTTP {err.code}: {detail}") from None
        except (error.URLError, OSError) as err:
            raise RegenerationError(f"{self.url}: {getattr(err, 'reason', err)}") from None
        try:
            return (data["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            raise RegenerationError(f"{self.url}: unexpected response {str(data)[:200]}") from None

    def __call__(self, conversations):
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.one, conversations))


def regenerate_rows(rows, generate, system_prompt=None, batch_size=8, progress=True):
    """[(row_id, row)] -> [(row_id, new_row)]: each assistant reply replaced by `generate`'s reply to
    the conversation so far. Rows that do not parse are returned unchanged (the data pipeline
    counts them as skipped). A conversation ends at its first empty reply.
    New rows are {"messages": [...]} with the system turn (if any), user turns and new replies.
    """
    convs, users = {}, {}
    for row_id, row in rows:
        try:
            msgs = row_to_messages(row, system_prompt)
        except BadRow:
            continue
        convs[row_id] = [m for m in msgs if m["role"] == "system"]
        users[row_id] = [m["content"] for m in msgs if m["role"] == "user"]
    open_ids = list(convs)
    turn = 0
    bar = tqdm(total=sum(len(u) for u in users.values()), desc="regenerating replies", disable=not progress)
    while open_ids:
        active = [r for r in open_ids if turn < len(users[r])]
        for i in range(0, len(active), batch_size):
            chunk = active[i:i + batch_size]
            prompts = [convs[r] + [{"role": "user", "content": users[r][turn]}] for r in chunk]
            for r, p, reply in zip(chunk, prompts, generate(prompts)):
                if reply:
                    convs[r] = p + [{"role": "assistant", "content": reply}]
                else:
                    users[r] = users[r][:turn]  # the conversation ends here
            bar.update(len(chunk))
        turn += 1
        open_ids = [r for r in active if turn < len(users[r])]
    bar.close()
    return [(row_id, {"messages": convs[row_id]} if row_id in convs else row) for row_id, row in rows]


def regenerate_cached(rows, generate, cache_file, system_prompt=None, batch_size=8, progress=True,
                      chunk_rows=None):
    """regenerate_rows with a JSONL cache ({"row_id", "row"} per line): rows already in the file
    are reused, new ones are appended every `chunk_rows` rows (default 4 batches; a kill loses at
    most one chunk)."""
    chunk_rows = chunk_rows or 4 * batch_size
    cache_file = Path(cache_file)
    done = read_cache(cache_file)
    if cache_file.is_file() and cache_file.stat().st_size:
        with open(cache_file, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a line cut by a kill: start the next one cleanly
                f.write(b"\n")
    todo = [(r, row) for r, row in rows if r not in done]
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    for i in range(0, len(todo), chunk_rows):
        new = regenerate_rows(todo[i:i + chunk_rows], generate, system_prompt, batch_size, progress)
        with open(cache_file, "a") as f:
            for r, row in new:
                f.write(json.dumps({"row_id": r, "row": row}) + "\n")
                done[r] = row
    return [(r, done[r]) for r, _ in rows]


def read_cache(cache_file) -> dict:
    """{row_id: row} of a regeneration cache file ({} when absent); lines cut by a kill are skipped."""
    done = {}
    if Path(cache_file).is_file():
        for line in Path(cache_file).read_text().splitlines():
            try:
                entry = json.loads(line)
                done[int(entry["row_id"])] = entry["row"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill: regenerated again
    return done


def rank_cache_file(out_dir, name, rank, world) -> Path:
    """The finished regeneration file of one rank: OUT_DIR/<name>.rank<r>-of-<world>.jsonl."""
    return Path(out_dir) / f"{name}.rank{rank:03d}-of-{world:03d}.jsonl"


def regenerate_sharded(rows, generate, out_dir, name, rank=0, world=1, system_prompt=None, batch_size=8,
                       progress=True, poll_seconds=5.0):
    """All rows regenerated by `world` processes together; every process gets all of them back.

    Rank r regenerates rows[r::world] into its own file (rank_cache_file): written as `.partial`
    through regenerate_cached (a killed run resumes it) and renamed when its share is done. Then each
    rank waits for the files of all ranks and reads them, so OUT_DIR must be visible to every rank
    (as the checkpoints are). Waiting polls the files: no collective timeout on long regenerations.
    """
    final = rank_cache_file(out_dir, name, rank, world)
    if not final.is_file():
        partial = final.with_name(final.name + ".partial")
        regenerate_cached(rows[rank::world], generate, partial, system_prompt, batch_size, progress)
        os.replace(partial, final)
    files = [rank_cache_file(out_dir, name, r, world) for r in range(world)]
    waiting = [f for f in files if not f.is_file()]
    if waiting:
        print(f"rank {rank}: waiting for the regenerated rows of {len(waiting)} other rank(s) in {final.parent}",
              flush=True)
    while waiting:
        time.sleep(poll_seconds)
        waiting = [f for f in waiting if not f.is_file()]
    done = {}
    for f in files:
        done.update(read_cache(f))
    missing = [r for r, _ in rows if r not in done]
    if missing:
        raise RegenerationError(f"{final.parent}: {len(missing)} rows (first {missing[0]}) are in none of the "
                                f"{world} rank files {files[0].name}...: they were made for other rows; delete them")
    return [(r, done[r]) for r, _ in rows]
