"""Host-device syncs of training, counted on CPU: the ops that make the host wait for a GPU
(.item() / float() / bool() of a tensor, nonzero, boolean-mask indexing, masked_select, tolist).
A micro-step of EAGLE-3 / EAGLE-2 TTT training makes two (the sizes of the selected rows), one of
EAGLE-1/2 training one; metrics stay on the device until a logging step, so the syncs of the
training loop do not grow with the number of logged metrics or of steps between logs."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from modules.data.collate import EagleCollator
from modules.draft.eagle3_draft import Eagle3Draft
from modules.draft.eagle_draft import EagleDraft
from modules.training.eagle_trainer import EagleTrainer, EagleTrainingArguments
from modules.training.ttt_trainer import TTTCollator
from tests._helpers_eagle import ListDataset, fake_items
from tests._helpers_eagle import tiny_target as tiny_llama
from tests._helpers_eagle3 import AUX, tiny_target
from tests.test_training_ttt_trainer import make_items, make_trainer

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
            aten.unique_consecutive.default, aten._unique2.default, aten.repeat_interleave.Tensor}
INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class CountSyncs(TorchDispatchMode):
    """Counts the ops that would block the host on a GPU (a CPU stand-in for
    torch.cuda.set_sync_debug_mode), plus Tensor.tolist (a device-to-host copy)."""

    def __init__(self):
        super().__init__()
        self.count, self.ops = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        bool_index = func in INDEX_OPS and any(
            torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        if func in SYNC_OPS or bool_index:
            self.count += 1
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist

        def tolist(t):
            self.count += 1
            self.ops.append("tolist")
            return self._tolist(t)
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def micro_step_syncs(trainer, batch):
    """Syncs of one training micro-step: loss, metrics, non-finite check, backward."""
    model = trainer.model
    model.train()
    batch = trainer._prepare_inputs(batch)
    with CountSyncs() as c:
        loss = trainer.compute_loss(model, batch)
        loss.backward()
    return c


def test_the_counter_sees_syncs():
    x = torch.arange(6.0)
    with CountSyncs() as c:
        x.sum().item(), float(x[0]), x[x > 2], x.nonzero(), (x > 1).tolist(), x[torch.tensor([1, 2])]
    assert c.count == 5, c.ops  # the last indexing (integer indices) does not sync


@pytest.mark.parametrize("arch", ["eagle3", "eagle2"])
def test_ttt_micro_step_makes_two_syncs(tmp_path, arch):
    target = tiny_target()
    items = make_items(target, n=4)
    torch.manual_seed(0)
    if arch == "eagle3":
        draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, 60), aux_layers=AUX)
    else:
        draft = EagleDraft.from_target(target)
    trainer = make_trainer(tmp_path, draft, target, items, eagle3=arch == "eagle3")
    trainer.args.ttt_steps = 7
    c = micro_step_syncs(trainer, TTTCollator(64)(items))
    assert c.count == 2, c.ops  # the number of trained slots, and of scored (step, slot) pairs
    assert trainer._sums["s6_n"] > 0  # the metrics of all 7 steps were accumulated, on the device
    assert all(torch.is_tensor(v) for v in trainer._sums.values())


def test_eagle_micro_step_makes_one_sync(tmp_path):
    target = tiny_llama("llama", seed=0)
    torch.manual_seed(0)
    trainer = EagleTrainer(model=EagleDraft.from_target(target), args=_eagle_args(tmp_path, max_steps=1),
                           data_collator=EagleCollator())
    c = micro_step_syncs(trainer, EagleCollator()(fake_items(target, n=2)))
    assert c.count == 1, c.ops  # the number of trained tokens
    assert trainer._sums["n_trained"] > 0 and all(torch.is_tensor(v) for v in trainer._sums.values())


def _eagle_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3,
                logging_steps=1000, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, warmup_steps=0, seed=0, gradient_accumulation_steps=2)
    base.update(kw)
    return EagleTrainingArguments(**base)


def _trainer(kind, tmp_path, steps):
    """A trainer of `steps` optimizer steps inside one epoch (the sampler's per-epoch work, on CPU
    tensors, is then the same for any number of steps), logging once at the end."""
    torch.manual_seed(0)
    if kind == "eagle":  # train.py: batch 2 x 2 accumulation micro-steps
        target = tiny_llama("llama", seed=0)
        return EagleTrainer(model=EagleDraft.from_target(target), train_dataset=ListDataset(fake_items(target, n=28)),
                            args=_eagle_args(tmp_path, max_steps=steps, logging_steps=steps),
                            data_collator=EagleCollator())
    target = tiny_target()  # train_eagle_ttt.py, EAGLE-3: batch 4, one micro-step
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, 60), aux_layers=AUX)
    trainer = make_trainer(tmp_path, draft, target, make_items(target, n=28), steps=steps)
    trainer.args.logging_steps = steps
    return trainer


@pytest.mark.parametrize("kind, loss_syncs_per_step", [("eagle", 2 * 1), ("eagle3_ttt", 1 * 2)])
def test_training_loop_syncs_per_step_are_those_of_the_loss(tmp_path, kind, loss_syncs_per_step):
    """Whole train() runs of 2 and 6 optimizer steps: the 4 extra steps add the loss's syncs and
    nothing from the metrics, the non-finite check or HF's NaN filter."""
    counts = {}
    for steps in (2, 6):
        trainer = _trainer(kind, tmp_path / str(steps), steps)
        with CountSyncs() as c:
            trainer.train()
        counts[steps] = c.count
        assert trainer.state.global_step == steps and trainer.state.epoch < 1
        assert any("top1_acc" in h for h in trainer.state.log_history)  # the metrics were logged
    assert counts[6] - counts[2] == 4 * loss_syncs_per_step, counts
