"""EagleTrainer on a tiny random target: CE gradient, collator alignment, simulated tau,
training with accumulation/padding/eval/checkpoints/resume, NaN stop, lr schedule."""
import os

import pytest
import torch
from transformers.cache_utils import DynamicCache

from modules.data.collate import EagleCollator
from modules.draft.eagle_draft import EagleDraft
from modules.training.eagle_trainer import (EagleTrainer, EagleTrainingArguments, NonFiniteLossError,
                             simulated_acceptance)
from tests._helpers_eagle import ListDataset, fake_items, tiny_target


@pytest.fixture(scope="module")
def target():
    return tiny_target("llama", seed=0)


def _draft(target, seed=0):
    torch.manual_seed(seed)
    return EagleDraft.from_target(target)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, per_device_eval_batch_size=2,
                learning_rate=3e-3, max_steps=6, logging_steps=2, save_steps=3, report_to="none",
                use_cpu=True, eval_strategy="no", save_strategy="steps", disable_tqdm=True,
                dataloader_num_workers=0, warmup_steps=1, seed=0)
    base.update(kw)
    return EagleTrainingArguments(**base)


def test_collator_shifts_and_pads():
    H = 4

    def item(T):
        return {"input_ids": torch.arange(T), "loss_mask": torch.tensor([0, 0] + [1] * (T - 2)),
                "hidden_states": torch.arange(T).float()[:, None].expand(T, H), "row_id": 0}

    b = EagleCollator()([item(6), item(4)])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 0, 0]]
    assert b["hidden_states"][0, :, 0].tolist() == [0, 1, 2, 3, 4]
    assert b["target"][0, :, 0].tolist() == [1, 2, 3, 4, 5]
    assert b["next_ids"].tolist() == [[2, 3, 4, 5, -1], [2, 3, -1, -1, -1]]
    assert b["loss_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


@pytest.mark.parametrize("detach", [False, True])
def test_cross_entropy_alone_trains_the_draft_unless_detached(tmp_path, target, detach):
    draft = _draft(target)
    trainer = EagleTrainer(model=draft, args=_args(tmp_path, w_reg=0.0, w_cls=1.0, noise_std=0.0,
                                                   detach_cls_pred=detach),
                           data_collator=EagleCollator())
    batch = EagleCollator()(fake_items(target, n=2))
    draft.train()
    loss, metrics = trainer.eagle_loss(draft, batch)
    assert loss.item() > 0 and metrics["cls_sum"] > 0
    loss.backward()
    for name, p in draft.named_parameters():
        if p.requires_grad:
            if detach:  # BaldEagle: the CE term carries no gradient at all
                assert p.grad is None or p.grad.abs().sum() == 0, name
            else:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert draft.lm_head.weight.grad is None  # frozen


def test_simulated_acceptance_matches_sequential_decoding(target):
    """The masked one-pass chain equals real step-by-step decoding with a KV cache."""
    draft = _draft(target).eval()
    batch = EagleCollator()(fake_items(target, n=1, min_len=16, max_len=16))
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    steps = 3
    with torch.no_grad():
        greedy = draft.compute_logits(batch["target"]).argmax(-1)[0]
        # make the data the target's own greedy tokens so that chains are never cut by the data
        batch["next_ids"][0, :-1] = greedy[:-1]
        acc_sum, count = simulated_acceptance(draft, batch, steps)
        expected = 0
        T = batch["input_ids"].shape[1]
        for t in range(T):
            if not batch["loss_mask"][0, t]:
                continue
            cache = DynamicCache()
            out = draft(batch["input_ids"][:, :t + 1], batch["hidden_states"][:, :t + 1], past_key_values=cache)[:, -1:]
            n = 0
            for s in range(steps):
                tok = draft.compute_logits(out).argmax(-1)
                if t + s >= T - 1 or tok.item() != greedy[t + s].item():
                    break
                n += 1
                out = draft(tok, out, past_key_values=cache)
            expected += n
    assert count == int(batch["loss_mask"].sum())
    assert acc_sum.item() == expected


def test_simulated_acceptance_of_a_perfect_draft_is_the_chain_length(target):
    """Data written by the draft itself (features and greedy tokens): every chain is accepted."""
    draft = _draft(target, seed=3).eval()
    T, steps = 14, 4
    with torch.no_grad():
        x = [5, 7]
        f = [torch.randn(1, 1, 64)]
        cache = DynamicCache()
        for t in range(T - 2):
            out = draft(torch.tensor([[x[t + 1]]]), f[t], past_key_values=cache)
            f.append(out)
            x.append(int(draft.compute_logits(out).argmax()))
        item = {"input_ids": torch.tensor(x[:T - 1]), "hidden_states": torch.cat(f, 1)[0],
                "loss_mask": torch.ones(T - 1, dtype=torch.long), "row_id": 0}
        batch = EagleCollator()([item])
        acc_sum, count = simulated_acceptance(draft, batch, steps)
    # origin t can run min(steps, slots left with a known next token) steps
    n_slots = T - 2
    valid = [t for t in range(n_slots) if batch["loss_mask"][0, t]]
    assert acc_sum.item() == sum(min(steps, n_slots - 1 - t) for t in valid)


def test_training_accumulation_eval_checkpoint_resume(tmp_path, target):
    items = fake_items(target, n=8)
    train_ds, eval_ds = ListDataset(items[:6]), ListDataset(items[6:])
    args = _args(tmp_path, gradient_accumulation_steps=2, eval_strategy="steps", eval_steps=3, sim_steps=3)
    trainer = EagleTrainer(model=_draft(target), args=args, data_collator=EagleCollator(),
                           train_dataset=train_ds, eval_dataset=eval_ds)
    trainer.train()
    logs = trainer.state.log_history
    train_logs = [entry for entry in logs if "loss" in entry and "reg_loss" in entry]
    eval_logs = [entry for entry in logs if "eval_tau_sim" in entry]
    assert len(train_logs) == 3 and len(eval_logs) == 2
    for key in ("reg_loss", "cls_loss", "top1_acc", "top2_acc", "top3_acc", "tokens_per_s", "learning_rate"):
        assert key in train_logs[0]
    assert train_logs[0]["top1_acc"] <= train_logs[0]["top2_acc"] <= train_logs[0]["top3_acc"] <= 1
    assert 1.0 <= eval_logs[-1]["eval_tau_sim"] <= 4.0
    assert train_logs[-1]["reg_loss"] < train_logs[0]["reg_loss"]
    ckpt = tmp_path / "out" / "checkpoint-3"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "config.json").exists()
    assert not (ckpt / "training_args.bin").exists() and (ckpt / "training_args.json").exists()
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    # resume from step 3 with a fresh draft: the same final weights as the uninterrupted run
    args2 = _args(tmp_path, gradient_accumulation_steps=2, eval_strategy="no", sim_steps=3)
    resumed = EagleTrainer(model=_draft(target, seed=1), args=args2, data_collator=EagleCollator(),
                           train_dataset=train_ds)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.state.global_step == 6
    for k, v in resumed.model.state_dict().items():
        assert torch.allclose(v, final[k], atol=1e-5), k


def test_nan_loss_stops_and_keeps_the_good_checkpoint(tmp_path, target):
    items = fake_items(target, n=8)
    bad = dict(items[7])
    bad["hidden_states"] = torch.full_like(bad["hidden_states"], float("nan"))
    # batches of 2 in order: steps 1-3 are clean, step 4 holds the NaN item
    ds = ListDataset(items[:6] + [items[6], bad])
    args = _args(tmp_path, max_steps=8, save_steps=2)
    trainer = EagleTrainer(model=_draft(target), args=args, data_collator=EagleCollator(), train_dataset=ds)
    trainer.get_train_dataloader = lambda: torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=EagleCollator())
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.train()
    ckpts = sorted(os.listdir(tmp_path / "out"))
    assert ckpts == ["checkpoint-2"]
    from safetensors.torch import load_file
    kept = load_file(str(tmp_path / "out" / "checkpoint-2" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in kept.values())


def _scheduled_lrs(tmp_path, target, steps=20, **schedule):
    """The learning rate at each of `steps` steps (peak 1.0, 4 warmup steps, floor 0.2)."""
    trainer = EagleTrainer(model=_draft(target), args=_args(tmp_path, warmup_steps=4, min_lr_ratio=0.2,
                                                          learning_rate=1.0, **schedule))
    trainer.create_optimizer()
    sched = trainer.create_scheduler(steps)
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        trainer.optimizer.step()
        sched.step()
    return lrs


def test_schedule_warmup_then_linear_to_min_ratio(tmp_path, target):
    lrs = _scheduled_lrs(tmp_path, target)
    assert lrs[0] < lrs[1] < lrs[3] < lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.2 + 0.8 * (1 - 15 / 16)) and min(lrs) >= 0.2 - 1e-9


def test_schedule_cosine_decays_from_peak_to_min_ratio(tmp_path, target):
    import math

    lrs = _scheduled_lrs(tmp_path, target, lr_schedule="cosine")
    assert lrs[4] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[12] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))  # halfway: 0.6
    assert lrs[-1] == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    # the cosine stays above the linear decay in its first half
    assert lrs[8] > 0.2 + 0.8 * (1 - 4 / 16)


def test_head_loss_in_chunks_equals_the_whole_loss_and_its_gradients():
    """The 128k-vocabulary case (logits over LOGIT_CHUNK_ELEMENTS) in chunks with recomputed logits: the same
    per-row losses, hit counts and gradients as computing all rows at once (a tiny head, a tiny chunk limit)."""
    from modules.draft.eagle_draft import EagleDraft
    from modules.training.eagle_trainer import head_loss
    from tests._helpers_eagle import tiny_target

    draft = EagleDraft.from_target(tiny_target("llama")).double()
    draft.lm_head.weight.requires_grad_(True)  # frozen in training; here it shows the head's gradient too
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(37, 64, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(37, 64, generator=g, dtype=torch.float64)
    results = {}
    for name, limit in (("whole", 1 << 27), ("chunks", 7 * 300)):  # 7 rows of the 300-token head a chunk
        pred.grad = draft.lm_head.weight.grad = None
        ce, hits = head_loss(draft, pred, target, max_elements=limit)
        (ce * torch.arange(37, dtype=torch.float64)).sum().backward()
        results[name] = (ce.detach(), hits, pred.grad.clone(), draft.lm_head.weight.grad.clone())
    (ce_w, hits_w, gp_w, gh_w), (ce_c, hits_c, gp_c, gh_c) = results["whole"], results["chunks"]
    assert torch.allclose(ce_w, ce_c, rtol=0, atol=1e-12)
    assert {k: int(v) for k, v in hits_w.items()} == {k: int(v) for k, v in hits_c.items()}
    assert torch.allclose(gp_w, gp_c, rtol=0, atol=1e-12) and torch.allclose(gh_w, gh_c, rtol=0, atol=1e-12)
    assert gp_w.abs().max() > 1e-3  # the gradient is there to compare
