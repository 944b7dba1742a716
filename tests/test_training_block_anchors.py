"""Anchor sampling of the block drafters (DFlash): training trains the blocks of --block-anchors sampled
anchors per conversation (every step of each), the loss is the mean over the sampled (step, anchor) pairs,
the draw is seeded, and evaluation and the sequential kinds are untouched."""
import pytest
import torch

from modules.draft import kinds as draft_kinds
from modules.training.ttt_trainer import TTTCollator, TTTTrainer, TTTTrainingArguments, sample_anchors
from tests._helpers_eagle3 import AUX, VOCAB, tiny_target
from tests.test_training_ttt_trainer import make_items


def test_sample_anchors_picks_n_candidates_per_row():
    candidates = torch.zeros(3, 20, dtype=torch.bool)
    candidates[0, 2:18] = True   # 16 candidates
    candidates[1, [1, 5, 9]] = True  # 3: fewer than n, all kept
    picked = sample_anchors(candidates, 5, torch.Generator().manual_seed(0))
    assert picked.sum(1).tolist() == [5, 3, 0]
    assert not (picked & ~candidates).any()
    again = sample_anchors(candidates, 5, torch.Generator().manual_seed(0))
    other = sample_anchors(candidates, 5, torch.Generator().manual_seed(1))
    assert torch.equal(picked, again) and not torch.equal(picked, other)
    # control: 0 (or n >= the length) keeps every candidate
    assert torch.equal(sample_anchors(candidates, 0, None), candidates)
    # uniform: over many draws every candidate of row 0 is picked about 5/16 of the time
    g = torch.Generator().manual_seed(2)
    freq = torch.stack([sample_anchors(candidates, 5, g)[0] for _ in range(2000)]).float().mean(0)
    assert freq[2:18].min() > 0.25 and freq[2:18].max() < 0.38 and freq[:2].sum() == 0


def trainer_for(tmp_path, kind, block_anchors, target, items):
    torch.manual_seed(0)  # the full vocabulary as draft vocabulary: every trained slot is scored
    draft = draft_kinds.get(kind).build(target, draft_ids=torch.arange(VOCAB), aux_layers=AUX, parallel_tokens=3)
    args = TTTTrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                                noise_std=0.0, w_reg=0.0, w_cls=1.0, ttt_steps=3, dataloader_num_workers=0, seed=0,
                                block_anchors=block_anchors)
    return TTTTrainer(model=draft, args=args, train_dataset=items, data_collator=TTTCollator(64),
                      target_head=target.lm_head.weight)


def selections(trainer, batch, training):
    """(loss, metrics, the (step, row, slot) pairs the unroll was asked for) of one micro-step."""
    seen = []
    unroll = trainer.draft_module().block_unroll

    def spy(slot_ids, features, slot_am, steps, select):
        seen.append(set(zip(*(x.tolist() for x in select))))
        return unroll(slot_ids, features, slot_am, steps, select)
    trainer.draft_module().block_unroll = spy
    trainer.model.train(training)
    with torch.no_grad():
        loss, metrics = trainer.eagle_loss(trainer.model, batch)
    return loss, metrics, seen[0]


def test_dflash_trains_the_sampled_anchors_only_and_averages_over_them(tmp_path):
    target = tiny_target()
    items = make_items(target, n=4)
    batch = TTTCollator(64)(items)
    full_loss, _, full = selections(trainer_for(tmp_path / "a", "dflash", 0, target, items), batch, True)
    sampled = trainer_for(tmp_path / "b", "dflash", 3, target, items)
    loss, m, pairs = selections(sampled, batch, True)
    anchors = {(b, t) for _, b, t in pairs}
    full_anchors = {(b, t) for _, b, t in full}
    for b in range(len(items)):  # 3 anchors per conversation, among those the full run trains
        assert len({t for bb, t in full_anchors if bb == b}) > 3
        assert len({t for bb, t in anchors if bb == b}) == 3
    assert anchors <= full_anchors
    # every scored step of a sampled anchor, and nothing else
    assert pairs == {(k, b, t) for k, b, t in full if (b, t) in anchors}
    # the loss is sum_k decay^k x the mean over step k's sampled pairs
    for k in range(3):
        assert int(m[f"s{k}_n"]) == sum(1 for kk, _, _ in pairs if kk == k)
    expected = sum(sampled.args.ttt_decay ** k * m[f"s{k}_loss"] / m[f"s{k}_n"] for k in range(3))
    torch.testing.assert_close(loss, expected)
    assert not torch.isclose(loss, full_loss)  # control: sampling changed what was trained
    # the draw is seeded: the same micro-step of the same step draws the same anchors again
    sampled._anchor_step = None
    assert selections(sampled, batch, True)[2] == pairs
    # ... and the next micro-step other ones
    assert selections(sampled, batch, True)[2] != pairs


def test_evaluation_scores_every_anchor(tmp_path):
    target = tiny_target()
    items = make_items(target, n=4)
    batch = TTTCollator(64)(items)
    full = selections(trainer_for(tmp_path / "a", "dflash", 0, target, items), batch, True)
    evaluated = selections(trainer_for(tmp_path / "b", "dflash", 3, target, items), batch, False)
    assert evaluated[2] == full[2]
    torch.testing.assert_close(evaluated[0], full[0])


@pytest.mark.parametrize("kind", ["eagle3", "peagle"])
def test_sequential_kinds_ignore_block_anchors(tmp_path, kind):
    """A kind that is not `anchored` computes every slot in its unroll anyway: the setting changes nothing."""
    assert not draft_kinds.get(kind).anchored and draft_kinds.get("dflash").anchored
    target = tiny_target()
    items = make_items(target, n=4)
    batch = TTTCollator(64)(items)
    losses = []
    for i, n in enumerate([0, 3]):
        trainer = trainer_for(tmp_path / str(i), kind, n, target, items)
        with torch.no_grad():
            losses.append(trainer.eagle_loss(trainer.model.train(), batch)[0])
    torch.testing.assert_close(losses[0], losses[1])
