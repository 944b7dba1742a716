"""Storage: bit-exact round trip, readable with safetensors alone, clear errors on bad folders."""
import json

import pytest
import torch
from safetensors.torch import load_file

from modules.data.storage import (FORMAT, DataFormatError, EagleDataset, list_shards, read_shard_stats,
                                  write_manifest, write_shard)


def _conv(row_id, n, h=8, aux=False, seed=0):
    g = torch.Generator().manual_seed(seed + row_id)
    c = {"input_ids": torch.randint(0, 1000, (n,), generator=g), "loss_mask": torch.randint(0, 2, (n,), generator=g),
         "hidden_states": torch.randn(n, h, generator=g).bfloat16(), "row_id": row_id}
    if aux:
        c["aux_hidden_states"] = torch.randn(n, 3 * h, generator=g).bfloat16()
    return c


def _manifest(folder, aux_layers=None, hidden=8, model="tiny"):
    write_manifest(folder, {"format": FORMAT, "model": model, "hidden_size": hidden, "dtype": "bfloat16",
                            "aux_layers": aux_layers})


@pytest.mark.parametrize("aux", [False, True])
def test_round_trip_bit_exact(tmp_path, aux):
    convs = [_conv(0, 5, aux=aux), _conv(2, 7, aux=aux), _conv(5, 1, aux=aux)]
    write_shard(tmp_path, 0, 4, convs[:2], {"empty": 1, "no_assistant_reply": 1})
    write_shard(tmp_path, 4, 8, [], {"empty": 4})  # every row skipped: an empty shard
    write_shard(tmp_path, 8, 10, convs[2:], {})
    _manifest(tmp_path, [2, 15, 27] if aux else None)
    ds = EagleDataset(tmp_path)
    assert len(ds) == 3 and ds.hidden_size == 8 and ds.model_name == "tiny"
    assert ds.lengths.tolist() == [5, 7, 1]
    for item, c in zip(ds, convs):
        assert item["row_id"] == c["row_id"]
        assert item["input_ids"].dtype == torch.long and item["loss_mask"].dtype == torch.long
        assert torch.equal(item["input_ids"], c["input_ids"]) and torch.equal(item["loss_mask"], c["loss_mask"])
        assert torch.equal(item["hidden_states"], c["hidden_states"])
        assert ("aux_hidden_states" in item) == aux
        if aux:
            assert torch.equal(item["aux_hidden_states"], c["aux_hidden_states"])
    # EAGLE-1/2 training reads the same folder without touching the fused features
    last_only = EagleDataset(tmp_path, read_aux=False)
    assert last_only.has_aux == aux and all("aux_hidden_states" not in item for item in last_only)
    assert torch.equal(last_only[1]["hidden_states"], convs[1]["hidden_states"])
    stats = [read_shard_stats(p) for p in list_shards(tmp_path)]
    assert (sum(s["rows"] for s in stats), sum(s["tokens"] for s in stats), len(stats)) == (3, 13, 3)
    skipped = {}
    for s in stats:
        for reason, n in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert skipped == {"empty": 5, "no_assistant_reply": 1}


def test_readable_with_safetensors_alone(tmp_path):
    convs = [_conv(3, 4), _conv(4, 6)]
    write_shard(tmp_path, 3, 5, convs, {})
    (path,) = list_shards(tmp_path)
    assert path.name == "shard-00000003-00000005.safetensors"
    t = load_file(str(path))
    assert t["input_ids"].dtype == torch.int32 and t["loss_mask"].dtype == torch.uint8
    assert t["offsets"].tolist() == [0, 4, 10] and t["row_ids"].tolist() == [3, 4]
    assert torch.equal(t["hidden_states"][4:10], convs[1]["hidden_states"])


def test_dataset_over_parent_and_list(tmp_path):
    for part, rows in (("part-0000", (0, 2)), ("part-0001", (2, 4))):
        d = tmp_path / part
        d.mkdir()
        write_shard(d, *rows, [_conv(rows[0], 3), _conv(rows[0] + 1, 2)], {})
        _manifest(d)
    assert [x["row_id"] for x in EagleDataset(tmp_path)] == [0, 1, 2, 3]
    assert len(EagleDataset([tmp_path / "part-0001", tmp_path / "part-0000"])) == 4
    assert len(EagleDataset(tmp_path).manifests) == 2


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataFormatError, match="no manifest.json"):
        EagleDataset(tmp_path)
    with pytest.raises(DataFormatError, match="not found"):
        EagleDataset(tmp_path / "missing")
    _manifest(tmp_path)
    with pytest.raises(DataFormatError, match="no conversations"):
        EagleDataset(tmp_path)
    write_shard(tmp_path, 0, 2, [_conv(0, 3)], {})
    bad = tmp_path / "shard-00000002-00000004.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DataFormatError, match="shard-00000002-00000004"):
        EagleDataset(tmp_path)
    bad.unlink()
    (tmp_path / "shard-00000002-00000004.safetensors.tmp").write_bytes(b"half written")  # killed run
    assert len(EagleDataset(tmp_path)) == 1
    other = tmp_path / "other"
    other.mkdir()
    write_shard(other, 0, 1, [_conv(0, 3, h=16)], {})
    _manifest(other, hidden=16)
    with pytest.raises(DataFormatError, match="hidden_size"):
        EagleDataset([tmp_path, other])
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["format"] = "something-else"
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataFormatError, match="format"):
        EagleDataset(tmp_path)


def test_dataset_copies_into_loader_workers(tmp_path):
    # DataLoader workers receive a copy of the dataset: open memory maps must not travel with it.
    import copy

    write_shard(tmp_path, 0, 2, [_conv(0, 4), _conv(1, 3)], {})
    _manifest(tmp_path)
    ds = EagleDataset(tmp_path)
    first = ds[0]
    clone = copy.deepcopy(ds)
    assert clone._handles == {} and torch.equal(clone[0]["hidden_states"], first["hidden_states"])
    batches = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=0))
    assert [b["row_id"] for b in batches] == [0, 1]
