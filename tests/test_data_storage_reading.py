"""Reading many shards: a bounded number of open memory maps (LRU), the same tensors through the
LRU as from the files, and the same training batches with 0 and 2 DataLoader workers."""
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modules.data.storage import EagleDataset, list_shards, write_shard
from tests._helpers_eagle import REPO_ROOT, fake_items, tiny_target
from tests.test_data_storage import _conv, _manifest


def _open_shard_maps(folder):
    """Shard files of `folder` that this process has memory-mapped now (Linux /proc)."""
    folder = str(folder)
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if folder in line}


@pytest.fixture
def many_shards(tmp_path):
    """40 shards of one or two conversations each."""
    for k in range(40):
        convs = [_conv(2 * k, 3 + k % 5)] + ([_conv(2 * k + 1, 4)] if k % 3 == 0 else [])
        write_shard(tmp_path, 2 * k, 2 * k + 2, convs, {})
    _manifest(tmp_path)
    return tmp_path


def test_open_maps_stay_within_the_bound_and_reads_equal_the_files(many_shards):
    ds = EagleDataset(many_shards, max_open_shards=4)
    assert len(ds.shards) == 40
    expected = {}
    for path in list_shards(many_shards):
        sd = load_file(str(path))
        for c, row in enumerate(sd["row_ids"].tolist()):
            a, b = int(sd["offsets"][c]), int(sd["offsets"][c + 1])
            expected[row] = {"input_ids": sd["input_ids"][a:b].long(), "loss_mask": sd["loss_mask"][a:b].long(),
                             "hidden_states": sd["hidden_states"][a:b].clone()}  # a copy, not a view of the map
        del sd
    order = list(range(len(ds))) * 2
    random.Random(0).shuffle(order)
    most = 0
    for i in order:
        item = ds[i]
        for key, value in expected[item["row_id"]].items():
            assert torch.equal(item[key], value), (i, key)
        del item  # items are views of the map: once dropped, only the dataset's handles hold maps
        most = max(most, len(_open_shard_maps(many_shards)))
        assert len(ds._handles) <= 4
    assert 1 <= most <= 4
    with pytest.raises(ValueError, match="max_open_shards"):
        EagleDataset(many_shards, max_open_shards=0)


def _trainer(data, workers, tmp_path):
    from modules.data.collate import EagleCollator
    from modules.draft.eagle_draft import EagleDraft
    from modules.training.eagle_trainer import EagleTrainer
    from train.train import parse_args, training_arguments

    args = parse_args(["--data", str(data), "--output-dir", str(tmp_path / f"w{workers}"), "--batch-size", "3",
                       "--precision", "fp32", "--dataloader-workers", str(workers)])
    targs = training_arguments(args, has_eval=False)
    assert targs.dataloader_num_workers == workers
    ds = EagleDataset(data, read_aux=False, max_open_shards=2)
    draft = EagleDraft.from_target(tiny_target("llama"))
    return EagleTrainer(model=draft, args=targs, train_dataset=ds, data_collator=EagleCollator())


def test_batches_are_identical_with_0_and_2_workers(tmp_path):
    target = tiny_target("llama")
    data = tmp_path / "data"
    data.mkdir()
    items = fake_items(target, n=24, min_len=6, max_len=20)
    for k in range(12):  # 12 shards of 2 conversations: workers read through their own LRU
        write_shard(data, 2 * k, 2 * k + 2, items[2 * k: 2 * k + 2], {})
    _manifest(data, hidden=target.config.hidden_size)
    runs = []
    for workers in (0, 2):
        loader = _trainer(data, workers, tmp_path).get_train_dataloader()
        torch.manual_seed(123)  # the sampler's order
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == 8
    for b0, b2 in zip(*runs):
        assert b0.keys() == b2.keys()
        for key in b0:
            assert torch.equal(b0[key], b2[key]), key


def test_dataset_settings_are_flags_of_both_training_scripts():
    import importlib.util

    for script in ("train.py", "train_eagle_ttt.py"):
        spec = importlib.util.spec_from_file_location(f"_flags_{script}", Path(REPO_ROOT) / "train" / script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        args = mod.parse_args(["--dataloader-workers", "3", "--prefetch-factor", "5", "--save-total-limit", "7"])
        assert (args.dataloader_workers, args.prefetch_factor, args.save_total_limit) == (3, 5, 7)
