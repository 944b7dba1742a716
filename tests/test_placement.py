"""Device placement (modules/placement.py): one device per process (cuda:LOCAL_RANK under torchrun),
a target spread over GPUs only when asked, features of layers on other devices gathered onto the
target's output device, and GPU indexes mapped through CUDA_VISIBLE_DEVICES (allocation.py)."""
import argparse

import pytest
import torch

import allocation
from modules import placement
from modules.data.features import gather_layers, target_features
from modules.placement import PlacementError, physical_gpus, plan_device
from modules.target import TargetLoadError, load_target_model
from tests._helpers_eagle import tiny_target

CUDA = torch.device


@pytest.mark.parametrize("device,gpus,local_rank,world,expected", [
    ("auto", 0, None, 1, CUDA("cpu")),          # no GPU: CPU
    ("auto", 0, 3, 4, CUDA("cpu")),             # torchrun on CPU (gloo): every rank on the CPU
    ("auto", 8, None, 1, CUDA("cuda", 0)),      # one process, 8 GPUs: the first one only, not all 8
    ("auto", 8, 5, 8, CUDA("cuda", 5)),         # torchrun rank 5: its own GPU
    ("cuda", 8, 7, 8, CUDA("cuda", 7)),
    ("cuda", 2, None, 1, CUDA("cuda", 0)),
    ("cuda:1", 2, 0, 2, CUDA("cuda", 1)),       # explicit index: as given
    ("cpu", 8, 2, 8, CUDA("cpu")),
])
def test_one_device_per_process(device, gpus, local_rank, world, expected):
    assert plan_device(device, gpus, local_rank, world) == expected


def test_spread_only_when_asked_and_never_by_several_ranks():
    assert plan_device("auto", 4, spread=True) == CUDA("cuda", 0)  # inputs start on the first GPU
    assert plan_device("cuda", 2, spread=True) == CUDA("cuda", 0)
    with pytest.raises(PlacementError, match="every rank would spread"):
        plan_device("auto", 8, local_rank=1, world_size=8, spread=True)
    with pytest.raises(PlacementError, match="machine with GPUs"):
        plan_device("auto", 0, spread=True)
    with pytest.raises(PlacementError, match="needs --device auto or cuda"):
        plan_device("cuda:1", 4, spread=True)
    with pytest.raises(PlacementError, match="LOCAL_RANK 2 but this process sees only 2"):
        plan_device("auto", 2, local_rank=2, world_size=4)
    with pytest.raises(PlacementError, match="no GPU is visible"):
        plan_device("cuda", 0)
    with pytest.raises(PlacementError, match="sees only 1"):
        plan_device("cuda:1", 1)


def test_pick_device_reads_the_launcher_environment(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("RANK", "7")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert placement.pick_device("auto") == CUDA("cuda", 3)
    assert placement.process_ranks() == (7, 8)
    with pytest.raises(PlacementError):
        placement.pick_device("auto", spread=True)
    for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k)
    assert placement.pick_device("auto") == CUDA("cuda", 0) and placement.process_ranks() == (0, 1)


def test_spread_on_a_cpu_machine_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(TargetLoadError, match="--spread-target"):
        load_target_model("unused-because-placement-is-checked-first", device="auto", spread=True)


def test_gather_layers_across_devices():
    # The layers of a spread target come back on different devices; the meta device stands in for a
    # second GPU here (a plain torch.cat of them raises, as it does across two GPUs).
    a, b = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError):
        torch.cat([a, b.to("meta")], dim=-1)
    out = gather_layers([a, b.to("meta")], [0, 1], "meta")
    assert out.device.type == "meta" and out.shape == (2, 5, 8)
    torch.testing.assert_close(gather_layers([a, b], [1, 0], "cpu"), torch.cat([b, a], dim=-1))


def test_target_features_of_a_target_spread_over_two_devices():
    """A tiny Llama with layers 2-3, the final norm and the LM head on a second device, moved there by
    the same accelerate hook device_map="auto" installs: features come back on the LM head's device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_target(num_hidden_layers=4)
    ids = torch.randint(0, 300, (2, 7))
    last_ref, aux_ref = target_features(model, ids, aux_layers=[1, 3])  # one device: the reference
    for module in [*model.model.layers[2:], model.model.norm, model.lm_head]:
        module.to("meta")
        add_hook_to_module(module, AlignDevicesHook(execution_device="meta"))
    assert placement.output_device(model) == CUDA("meta")
    last, aux = target_features(model, ids, aux_layers=[1, 3])  # layer 1's input is on cpu, layer 3's on meta
    assert last.device.type == aux.device.type == "meta"
    assert last.shape == last_ref.shape and aux.shape == aux_ref.shape == (2, 7, 128)


def test_allocation_maps_gpu_indexes_to_the_visible_physical_ids(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = argparse.Namespace(start=0, end=10, num_shards=1, shard_index=0, workers=None, gpus=None)
    plan = allocation.worker_plan(args)  # default: one worker per visible GPU
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["4", "5"]
    args.gpus = ["0,1"]  # one worker spread over both visible GPUs
    (worker,) = allocation.worker_plan(args)
    assert worker["env"]["CUDA_VISIBLE_DEVICES"] == "4,5" and worker["gpus"] == ["4", "5"]
    args.gpus = ["2"]
    with pytest.raises(SystemExit, match="GPU index 2 but CUDA_VISIBLE_DEVICES=4,5"):
        allocation.worker_plan(args)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")  # unset: indexes are the physical ids
    args.gpus = ["2,3"]
    assert allocation.worker_plan(args)[0]["env"]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert physical_gpus([1, 0], {"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}) == ["GPU-bb", "GPU-aa"]


def test_allocation_spreads_the_target_of_a_multi_gpu_worker_only(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(allocation.subprocess, "Popen", lambda cmd, **kw: calls.append((cmd, kw["env"])))
    monkeypatch.setenv("LOCAL_RANK", "1")  # allocation.py started from inside a launcher
    args = allocation.Settings(start=0, end=10, workers=None, gpus=["0,1", "2"], output_dir=str(tmp_path))
    for w in allocation.worker_plan(args):
        allocation.launch(w, args, [])
    (cmd0, env0), (cmd1, env1) = calls
    assert "--spread-target" in cmd0 and "--spread-target" not in cmd1
    assert "LOCAL_RANK" not in env0 and "LOCAL_RANK" not in env1  # each worker is its own process group


def test_a_plain_training_process_uses_one_gpu_not_data_parallel(tmp_path):
    """HF's Trainer wraps the draft in nn.DataParallel over every visible GPU when a plain process sees
    several (it sets n_gpu to the device count); placement says one device per process."""
    from transformers import Trainer

    from modules.training.eagle_trainer import EagleTrainingArguments

    args = EagleTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = Trainer(model=torch.nn.Linear(4, 4), args=args)
    args._n_gpu = 8  # what transformers sets on a machine with 8 visible GPUs and no launcher
    assert args.n_gpu == 1 and args.train_batch_size == args.per_device_train_batch_size
    assert not isinstance(trainer._wrap_model(trainer.model), torch.nn.DataParallel)


def test_same_device_treats_every_cpu_name_as_one_device():
    """HF's Trainer names the CPU cpu:0 under torchrun while a loaded target sits on cpu: one device (the online
    target check of train/train_eagle_ttt.py); GPUs compare by index, cuda = cuda:0."""
    assert placement.same_device("cpu", "cpu:0") and placement.same_device(torch.device("cuda"), "cuda:0")
    assert not placement.same_device("cuda:1", "cuda:0") and not placement.same_device("cpu", "cuda:0")
