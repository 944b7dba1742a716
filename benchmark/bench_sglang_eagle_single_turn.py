"""Client of an SGLang server running EAGLE: acceptance length and throughput on MT-bench turn 1.

Start the server with an exported draft (docs/serving.md, docs/gpu.md), e.g.

    python -m sglang.launch_server --model meta-llama/Llama-3.1-8B-Instruct \
        --speculative-algorithm EAGLE --speculative-draft-model-path outputs/eagle2/export \
        --speculative-num-steps 5 --speculative-eagle-topk 8 --speculative-num-draft-tokens 64 --port 30000

then `python benchmark/bench_sglang_eagle_single_turn.py --port 30000`.
Acceptance length = completion_tokens / spec_verify_ct (SGLang's meta_info), the bonus token
included, summed over all requests. The chat template is applied here with the model's
tokenizer (default: the server's model_path) and token ids are sent to the native /generate.
Needs only the standard library plus transformers (for the tokenizer).
"""
import json
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from modules.settings import parse_settings, setting

# ---- SETTINGS ----------------------------------------------------------------------------
# Edit a default here or pass the flag (--port 30001); --config FILE reads them from a JSON/YAML file.
@dataclass
class Settings:
    host: str = setting("http://127.0.0.1", "the SGLang server's address")
    port: int = setting(30000, "the SGLang server's port")
    tokenizer: str | None = setting(None, "tokenizer for the chat template (None: the server's model_path, GET "
                                          "/get_model_info)")
    question_file: str | None = setting(None, "questions (None: benchmark/data/mt_bench_questions.jsonl)")
    num_questions: int = setting(80, "questions")
    max_new_tokens: int = setting(512, "tokens per answer")
    temperature: float = setting(0.0, "sampling temperature")
    parallel: int = setting(1, "concurrent requests (1 = latency, batch size 1, as EAGLE papers report)")
    turns: int = setting(1, "turns per question (each after the server's own previous answers)")
    out: str = setting("benchmark/results/sglang_single_turn.json", "result file (JSON)")
# -------------------------------------------------------------------------------------------


def parse_args(argv=None, settings=Settings) -> Settings:
    return parse_settings(settings, argv, description=__doc__.split("\n")[0])


def http_json(url, payload=None, timeout=600):
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def generate(base_url, input_ids, max_new_tokens, temperature):
    """One /generate call -> (text, completion_tokens, spec_verify_ct)."""
    out = http_json(f"{base_url}/generate", {
        "input_ids": input_ids,
        "sampling_params": {"temperature": temperature, "max_new_tokens": max_new_tokens},
    })
    meta = out.get("meta_info", {})
    if "spec_verify_ct" not in meta:
        raise RuntimeError("server reply has no meta_info.spec_verify_ct: is speculative decoding enabled?")
    return out["text"], int(meta["completion_tokens"]), int(meta["spec_verify_ct"])


def run_question(base_url, tokenizer, question, turns, max_new_tokens, temperature):
    """All turns of one question, each after the server's own previous answers."""
    from benchmark.mt_bench import conversation, prompt_ids

    answers, rows = [], []
    for t in range(min(turns, len(question["turns"]))):
        ids = prompt_ids(tokenizer, conversation(question["turns"][:t + 1], answers))
        start = time.perf_counter()
        text, tokens, verify = generate(base_url, ids, max_new_tokens, temperature)
        rows.append({"question_id": question["question_id"], "turn": t + 1, "completion_tokens": tokens,
                     "spec_verify_ct": verify, "seconds": round(time.perf_counter() - start, 4)})
        answers.append(text.strip())
    return rows


def summarize(rows, wall_s):
    tokens = sum(r["completion_tokens"] for r in rows)
    verify = sum(r["spec_verify_ct"] for r in rows)
    out = {"requests": len(rows), "completion_tokens": tokens, "spec_verify_ct": verify,
           "acceptance_length": round(tokens / verify, 4) if verify else None,
           "output_throughput_tok_s": round(tokens / wall_s, 2) if wall_s else None, "wall_s": round(wall_s, 2)}
    for t in sorted({r["turn"] for r in rows}):
        rt = [r for r in rows if r["turn"] == t]
        v = sum(r["spec_verify_ct"] for r in rt)
        out[f"turn{t}_acceptance_length"] = round(sum(r["completion_tokens"] for r in rt) / v, 4) if v else None
    return out


def main(argv=None, settings=Settings):
    """settings: this script's Settings, or another client's subclass (bench_sglang_eagle_double_turn.py)."""
    args = parse_args(argv, settings)
    from benchmark.mt_bench import QuestionFileError, load_questions
    from modules import paths

    base_url = f"{args.host}:{args.port}"
    try:
        questions, _ = load_questions(args.question_file or paths.MT_BENCH_QUESTIONS, args.num_questions)
    except QuestionFileError as e:
        sys.exit(f"error: {e}")
    try:
        name = args.tokenizer or http_json(f"{base_url}/get_model_info")["model_path"]
    except OSError as e:
        sys.exit(f"error: no SGLang server at {base_url} ({e})")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(name)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(args.parallel, 1)) as pool:
        results = list(pool.map(lambda q: run_question(base_url, tokenizer, q, args.turns, args.max_new_tokens,
                                                       args.temperature), questions))
    rows = [r for rs in results for r in rs]
    summary = summarize(rows, time.perf_counter() - start)
    print(json.dumps(summary, indent=2))
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"settings": vars(args), "summary": summary, "requests": rows}, indent=2))
    os.replace(tmp, path)
    print(f"wrote {path}")
    return summary


if __name__ == "__main__":
    main()
