"""Self-distilled data (--replies greedy|sampled, modules/data/self_distill.py): the features kept
while the target writes its replies equal a second full forward over the final conversation, ids
and loss mask are the chat-template path's, greedy replies are HF generate's, sampled replies are
reproducible per row, a rerun skips finished shards, and allocation.py runs it per worker."""
import subprocess
import sys

import pytest
import torch

import generate_data
import generate_data_fused_features
from modules.data.features import target_features
from modules.data.generation import GenerationSettings, generate_folder
from modules.data.loss_mask import tokenize_conversation
from modules.data.regenerate import LocalGenerator, regenerate_rows
from modules.data.self_distill import SelfDistiller, prompt_ids
from modules.data.storage import EagleDataset, list_shards, read_manifest
from modules.paths import REPO_ROOT
from tests._helpers_data import chat_rows, tiny_target_dir, write_jsonl

ROWS = [  # (row_id, dataset messages): the replies here are replaced; multi-turn, with and without system
    (0, [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "old"},
         {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "old"}]),
    (4, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."},
         {"role": "assistant", "content": "old"}]),
]


@pytest.fixture(scope="module")
def tiny_targets(tmp_path_factory):
    """Tiny random Llamas with ChatML and Llama-3 (trimming) templates: random replies rarely
    re-tokenise to the generated ids, so the cut-back-and-recompute path runs too."""
    from modules.target import load_target

    base = tmp_path_factory.mktemp("self_distill")
    out = {}
    for family in ("chatml", "llama3"):
        folder = tiny_target_dir(base / family, family=family, layers=3)
        out[family] = (folder, *load_target(folder, dtype="fp32", device="cpu"))
    out["untied"] = tiny_target_dir(base / "untied", layers=4, tie=False)  # greedy replies that are not empty
    out["rows"] = write_jsonl(base / "rows.jsonl", chat_rows(5))
    return out


def check_against_full_forward(model, tokenizer, results, max_length, aux_layers, atol, rtol=0.0):
    for conv in results:
        assert isinstance(conv, dict), conv
        ids, mask, truncated = tokenize_conversation(tokenizer, conv["messages"], max_length)
        assert conv["input_ids"].tolist() == ids and conv["loss_mask"].tolist() == mask
        assert conv["truncated"] == truncated
        last, aux = target_features(model, torch.tensor([ids]), None, aux_layers)
        torch.testing.assert_close(conv["hidden_states"], last[0], atol=atol, rtol=rtol)
        torch.testing.assert_close(conv["aux_hidden_states"], aux[0], atol=atol, rtol=rtol)


def test_smollm2_greedy_features_ids_and_replies(smollm2):
    """Greedy on the embedded target: features = full forward (fp32), ids/mask = chat template,
    every token run through the target once, replies = HF generate greedy (via --regenerate's generator)."""
    model, tokenizer = smollm2
    distiller = SelfDistiller(model, tokenizer, max_length=256, mode="greedy", max_new_tokens=5, batch_size=2,
                              aux_layers=[1, 15, 27])
    results = distiller(ROWS, store_dtype=torch.float32)
    check_against_full_forward(model, tokenizer, results, 256, [1, 15, 27], atol=1e-4, rtol=1e-4)
    assert [r["row_id"] for r in results] == [0, 4]
    assert len(results[0]["messages"]) == 4 and results[1]["messages"][0]["content"] == "Be brief."
    stored = sum(len(r["input_ids"]) for r in results)
    assert distiller.forwarded == stored == sum(r["forwarded"] for r in results)  # no second pass
    hf = LocalGenerator(model, tokenizer, temperature=0, max_new_tokens=5, max_prompt_tokens=256)
    reference = dict(regenerate_rows([(r, {"messages": m}) for r, m in ROWS], hf, batch_size=1, progress=False))
    assert [r["messages"] for r in results] == [reference[0]["messages"], reference[4]["messages"]]


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_tiny_random_target_matches_full_forward(tiny_targets, family):
    """Random replies (special tokens, odd merges, trimmed by the Llama-3 template) and a max-length
    cut mid-reply: what is stored is still exactly the chat-template conversation and its forward."""
    _, model, tokenizer = tiny_targets[family]
    rows = ROWS + [(7, [{"role": "user", "content": "Hello there! " * 3}, {"role": "assistant", "content": "x"},
                        {"role": "user", "content": "Write a poem about the sea."}])]
    first_prompt = {r: len(prompt_ids(tokenizer, [m for m in msgs if m["role"] == "system"] +
                                      [next(m for m in msgs if m["role"] == "user")])) for r, msgs in rows}
    cut = first_prompt[0] + 5  # row 0's first reply is cut by the max length
    for max_length, batch in ((384, 3), (cut, 2)):
        distiller = SelfDistiller(model, tokenizer, max_length=max_length, mode="sampled", temperature=1.0,
                                  max_new_tokens=12, batch_size=batch, aux_layers=[0, 1, 2])
        results = distiller(rows, store_dtype=torch.float32)
        check_against_full_forward(model, tokenizer, [r for r in results if isinstance(r, dict)], max_length,
                                   [0, 1, 2], atol=1e-5)
        assert distiller.forwarded >= sum(len(r["input_ids"]) for r in results if isinstance(r, dict))
    assert results[0]["truncated"] and len(results[0]["input_ids"]) == cut
    for (row_id, _), result in zip(rows, results):  # no room for a reply after the first prompt: skipped
        assert (result == "no_assistant_reply") == (first_prompt[row_id] >= cut)


def test_sampled_replies_are_reproducible_per_row(tiny_targets):
    _, model, tokenizer = tiny_targets["chatml"]

    def replies(examples, batch_size, seed=0):
        d = SelfDistiller(model, tokenizer, 256, "sampled", 1.0, max_new_tokens=10, seed=seed, batch_size=batch_size)
        return {r["row_id"]: r["messages"] for r in d(examples) if isinstance(r, dict)}

    both = replies(ROWS, 2)
    assert replies(ROWS[1:], 1) == {4: both[4]}  # another batch, alone: the same reply (seeded per row)
    assert replies(ROWS, 2) == both
    assert replies(ROWS, 2, seed=1) != both


def test_bad_settings_end_with_one_error_line(capsys):
    base = ["--end", "2", "--outdir", "/nonexistent/never-written", "--no-progress"]
    assert generate_data.main(base + ["--replies", "sampled", "--temperature", "0"]) == 2
    assert "--replies sampled needs --temperature > 0" in capsys.readouterr().err
    assert generate_data.main(base + ["--replies", "greedy", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err
    assert generate_data_fused_features.main(base + ["--replies", "greedy", "--regenerate"]) == 2
    assert "use one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_data.main(base + ["--replies", "beam"])
    assert "invalid choice" in capsys.readouterr().err


def test_resume_skips_finished_shards_and_writes_the_same_bytes(tiny_targets, tmp_path, monkeypatch):
    import modules.data.self_distill as self_distill
    from modules.data.chat import load_rows

    folder, model, tokenizer = tiny_targets["chatml"]
    rows = load_rows(tiny_targets["rows"], 0, 5)
    settings = GenerationSettings(model="tiny", dataset="rows", start=0, end=5, max_length=256, rows_per_shard=2,
                                  replies="sampled", temperature=1.0, max_new_tokens=6, seed=3, reply_batch_size=2,
                                  aux_layers=[0, 2])
    first = generate_folder(model, tokenizer, rows, tmp_path / "a", settings, progress=False)
    assert first["complete"] and first["rows_written"] == 5 and len(list_shards(tmp_path / "a")) == 3
    assert first["replies"] == {"mode": "sampled", "temperature": 1.0, "max_new_tokens": 6, "seed": 3,
                                "batch_size": 2}
    # a killed run: one shard missing, the manifest not complete
    shards = {p.name: p.read_bytes() for p in list_shards(tmp_path / "a")}
    missing = sorted(shards)[1]
    (tmp_path / "a" / missing).unlink()
    seen = []
    real_call = self_distill.SelfDistiller.__call__
    monkeypatch.setattr(self_distill.SelfDistiller, "__call__",
                        lambda self, ex, *a, **k: seen.extend(r for r, _ in ex) or real_call(self, ex, *a, **k))
    again = generate_folder(model, tokenizer, rows, tmp_path / "a", settings, progress=False)
    assert seen == [2, 3]  # only the rows of the missing shard were generated again
    assert again["complete"] and {p.name: p.read_bytes() for p in list_shards(tmp_path / "a")} == shards
    ds = EagleDataset(tmp_path / "a")
    assert len(ds) == 5 and ds[0]["aux_hidden_states"].shape[-1] == 2 * model.config.hidden_size
    # other reply settings do not resume into this folder
    from modules.data.generation import GenerationError
    with pytest.raises(GenerationError, match="replies="):
        generate_folder(model, tokenizer, rows, tmp_path / "a",
                        GenerationSettings(**{**settings.__dict__, "replies": "greedy"}), progress=False)


def test_allocation_runs_greedy_replies_per_worker(tiny_targets, tmp_path):
    folder = tiny_targets["untied"]
    out = tmp_path / "alloc"
    cmd = [sys.executable, "allocation.py", "--outdir", str(out), "--workers", "2", "--end", "4", "--dataset",
           tiny_targets["rows"], "--script", "generate_data_fused_features.py", "--", "--replies", "greedy",
           "--model", folder, "--max-new-tokens", "4", "--max-length", "256", "--dtype", "fp32"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    parts = sorted(out.glob("part-*"))
    assert len(parts) == 2
    for part in parts:
        m = read_manifest(part)
        assert m["complete"] and m["replies"]["mode"] == "greedy" and m["aux_layers"] and m["skipped"] == {}
    assert len(EagleDataset(out)) == 4
