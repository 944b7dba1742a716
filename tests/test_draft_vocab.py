"""Draft vocabulary: counting only trained tokens, coverage rule, official d2t/t2d format."""
import pytest
import torch
from safetensors.torch import save_file

from modules.draft.vocab import build_mappings, count_tokens, select_draft_vocab, shard_token_pairs


def test_counts_only_loss_masked_tokens():
    ids = torch.tensor([5, 5, 7, 9, 9, 9])
    mask = torch.tensor([1, 1, 1, 0, 0, 1])
    counts = count_tokens([(ids, mask)], vocab_size=10)
    assert counts[5] == 2 and counts[7] == 1 and counts[9] == 1 and counts.sum() == 4


def test_smallest_n_reaching_coverage():
    counts = torch.zeros(100, dtype=torch.long)
    counts[[3, 50, 7, 99]] = torch.tensor([50, 30, 15, 5])
    ids, cov = select_draft_vocab(counts, coverage=0.95)  # 50+30+15 = 95%
    assert ids.tolist() == [3, 7, 50] and cov == pytest.approx(0.95)
    ids, cov = select_draft_vocab(counts, coverage=0.96)
    assert ids.tolist() == [3, 7, 50, 99] and cov == pytest.approx(1.0)
    ids, cov = select_draft_vocab(counts, coverage=0.5)
    assert ids.tolist() == [3] and cov == pytest.approx(0.5)


def test_fixed_size_fills_with_unused_ids_and_forced_tokens():
    counts = torch.zeros(20, dtype=torch.long)
    counts[[10, 12]] = torch.tensor([4, 6])
    ids, cov = select_draft_vocab(counts, size=5, always_include=[2])
    assert ids.numel() == 5 and {2, 10, 12} <= set(ids.tolist()) and cov == 1.0
    ids, _ = select_draft_vocab(counts, size=1)
    assert ids.tolist() == [12]
    with pytest.raises(ValueError):
        select_draft_vocab(counts, size=21)
    with pytest.raises(ValueError):
        select_draft_vocab(torch.zeros(5, dtype=torch.long))


def test_official_mapping_format():
    ids = torch.tensor([0, 3, 4, 9])
    d2t, t2d = build_mappings(ids, vocab_size=12)
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool
    assert d2t.tolist() == [0, 2, 2, 6]  # target id = draft id + d2t[draft id]
    assert (torch.arange(4) + d2t).tolist() == ids.tolist()
    assert t2d.nonzero().flatten().tolist() == ids.tolist()
    with pytest.raises(ValueError):
        build_mappings(torch.tensor([3, 1]), 12)


def test_reads_token_ids_from_shards(tmp_path):
    part = tmp_path / "part-0000"
    part.mkdir()
    save_file({"input_ids": torch.tensor([1, 2, 2, 3], dtype=torch.int32),
               "loss_mask": torch.tensor([0, 1, 1, 1], dtype=torch.uint8),
               "hidden_states": torch.zeros(4, 8, dtype=torch.bfloat16)},
              str(part / "shard-00000000-00000002.safetensors"))
    counts = count_tokens(shard_token_pairs(tmp_path), 6)
    ids, covered = select_draft_vocab(counts, coverage=0.6)
    assert ids.tolist() == [2] and covered == pytest.approx(2 / 3)
    assert counts.tolist() == [0, 0, 2, 1, 0, 0]
    with pytest.raises(FileNotFoundError):
        list(shard_token_pairs(tmp_path / "nothing"))



def test_unreadable_shard_is_named_with_its_cause(tmp_path):
    from safetensors import SafetensorError

    corrupt, foreign = tmp_path / "corrupt", tmp_path / "foreign"
    corrupt.mkdir()
    foreign.mkdir()
    (corrupt / "shard-00000000-00000002.safetensors").write_bytes(b"not a safetensors file")
    save_file({"input_ids": torch.zeros(2, dtype=torch.int32)}, str(foreign / "shard-00000000-00000002.safetensors"))
    for folder in (corrupt, foreign):  # unreadable header; no loss_mask tensor
        with pytest.raises(ValueError, match=f"{folder.name}/shard-00000000-00000002.safetensors: cannot read") as err:
            list(shard_token_pairs(folder))
        assert isinstance(err.value.__cause__, SafetensorError)
