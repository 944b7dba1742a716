"""Data generation with many tiny shards: forward batches are formed across shard boundaries and
reach the token budget; shards are sized by bytes."""
import torch

import generate_data
import modules.data.generation as generation
from modules.data.generation import auto_rows_per_shard, batch_window_shards
from modules.data.storage import EagleDataset, list_shards, read_manifest
from tests.test_script_generate_data import gen_cmd, main_in_process, tiny  # noqa: F401  (tiny is a fixture)


def test_batches_fill_the_token_budget_across_one_row_shards(tiny, tmp_path, capsys, monkeypatch):  # noqa: F811
    model, data = tiny
    forwards = []
    real_features = generation.target_features

    def recording(model_, input_ids, attention_mask, aux_layers):
        forwards.append((tuple(input_ids.shape), int(attention_mask.sum())))
        return real_features(model_, input_ids, attention_mask, aux_layers)

    monkeypatch.setattr(generation, "target_features", recording)
    budget = 1024
    argv = gen_cmd(model, data, tmp_path / "d")[2:]
    argv[argv.index("--rows-per-shard") + 1] = "1"      # 24 shards of one row each
    argv[argv.index("--batch-tokens") + 1] = str(budget)
    code, _, err = main_in_process(generate_data, argv, capsys)
    assert code == 0, err
    assert len(list_shards(tmp_path / "d")) == 24 and read_manifest(tmp_path / "d")["complete"]
    n_rows = sum(real for _, real in forwards)
    padded = [b * t for (b, t), _ in forwards]
    assert all(p <= budget for p in padded)
    assert batch_window_shards(1, budget, 384) == 22  # windows of 22 + 2 one-row shards
    assert max(b for (b, _), _ in forwards) > 1 and len(forwards) < 24 / 2
    fill = sum(padded) / (len(forwards) * budget)
    assert fill > 0.5, (fill, forwards)
    print(f"forwards {len(forwards)}, padded sizes {padded}, fill {fill:.2f}")
    # every stored conversation was computed exactly once
    assert int(EagleDataset(tmp_path / "d").lengths.sum()) == n_rows


def test_shards_are_sized_by_bytes():
    bf16 = torch.bfloat16
    gib = 2**30
    # per token: hidden x 2 bytes x (1 + aux layers) + 5; rows of max length 2048
    assert auto_rows_per_shard(4096, 2048, bf16, 0, gib) == gib // ((4096 * 2 + 5) * 2048) == 63   # 8B EAGLE-1/2
    assert auto_rows_per_shard(4096, 2048, bf16, 3, gib) == 15                                      # 8B fused
    assert auto_rows_per_shard(8192, 2048, bf16, 3, gib) == 7                                       # 70B fused
    assert auto_rows_per_shard(8192, 2048, bf16, 3, 2**20) == 1                                     # never 0
    # 8B fused at the GPU default of 16384 tokens: 5 shards of 15 rows are batched together
    assert batch_window_shards(15, 16384, 2048) == 5
    assert batch_window_shards(15, 1, 2048) == 1  # one conversation per forward (CPU): shard by shard


def test_auto_rows_per_shard_resumes_a_folder_begun_with_another_size(tiny, tmp_path, capsys):  # noqa: F811
    model, data = tiny
    row_bytes = (64 * 2 + 5) * 384  # tiny target (hidden 64), bf16 features, max length 384

    def argv(shard_bytes):
        a = gen_cmd(model, data, tmp_path / "d")[2:]
        a[a.index("--rows-per-shard") + 1] = "0"
        return a + ["--shard-bytes", str(shard_bytes)]

    assert main_in_process(generate_data, argv(3 * row_bytes), capsys)[0] == 0
    shards = list_shards(tmp_path / "d")
    assert len(shards) == 8 and read_manifest(tmp_path / "d")["rows_per_shard"] == 3
    kept = {p.name: p.read_bytes() for p in shards}
    for p in shards[-3:]:  # as if the run had been stopped after 5 shards
        p.unlink()
    # the rerun (here: with a new --shard-bytes; likewise after a change of the default) finishes the
    # folder with its own 3 rows per shard instead of refusing it
    code, _, err = main_in_process(generate_data, argv(5 * row_bytes), capsys)
    assert code == 0, err
    assert {p.name: p.read_bytes() for p in list_shards(tmp_path / "d")} == kept
    assert read_manifest(tmp_path / "d")["complete"]
