"""Checkpoints: no frozen weights in them (the target's embedding / lm_head are reloaded from the
target), frozen weights kept in the training dtype, resume gives the same state, and
save_total_limit deletes the older checkpoints."""
import os

import pytest
import torch
from safetensors.torch import load_file

from modules.data.collate import EagleCollator
from modules.draft import kinds as draft_kinds
from modules.draft.eagle_draft import EagleDraft
from modules.training.eagle_trainer import EagleTrainer, EagleTrainingArguments
from modules.training.ttt_trainer import TTTCollator, TTTTrainer, TTTTrainingArguments
from tests import _helpers_eagle3
from tests._helpers_eagle import ListDataset, fake_items, tiny_target
from tests.test_training_ttt_trainer import make_items


def _args(cls, out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=2, learning_rate=3e-3, max_steps=6,
                logging_steps=2, save_strategy="steps", save_steps=2, save_total_limit=2, report_to="none",
                use_cpu=True, bf16=True, eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                warmup_steps=1, seed=0)
    base.update(kw)
    return cls(**base)


def _eagle2_trainer(target, out, seed, **kw):
    torch.manual_seed(seed)
    draft = EagleDraft.from_target(target)
    return EagleTrainer(model=draft, args=_args(EagleTrainingArguments, out, **kw), data_collator=EagleCollator(),
                        train_dataset=ListDataset(fake_items(target, n=8)))


def test_eagle2_checkpoints_hold_no_frozen_weights_and_resume_to_the_same_state(tmp_path):
    target = tiny_target("llama")
    trainer = _eagle2_trainer(target, tmp_path / "out", seed=0)
    draft = trainer.draft_module()
    # frozen weights in the training dtype (bf16 autocast), trained ones fp32
    assert draft.embed_tokens.weight.dtype == draft.lm_head.weight.dtype == torch.bfloat16
    assert draft.fc.weight.dtype == torch.float32
    trainer.train()
    # save_total_limit=2: of checkpoint-2/4/6 only the last two are left
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-4", "checkpoint-6"]
    saved = load_file(str(tmp_path / "out" / "checkpoint-4" / "model.safetensors"))
    trained = {k for k, p in draft.named_parameters() if p.requires_grad}
    assert set(saved) == trained and not any(k.startswith(("embed_tokens", "lm_head")) for k in saved)
    final = {k: v.clone() for k, v in draft.state_dict().items()}

    # a fresh draft (other seed) resumed from step 4 ends with the uninterrupted run's weights,
    # its frozen weights the target's (in bf16), never read from the checkpoint
    resumed = _eagle2_trainer(target, tmp_path / "out2", seed=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))
    assert resumed.state.global_step == 6
    state = resumed.draft_module().state_dict()
    assert state.keys() == final.keys()
    for k, v in state.items():
        assert v.dtype == final[k].dtype and torch.allclose(v.float(), final[k].float(), atol=1e-5), k
    assert torch.equal(state["embed_tokens.weight"], target.model.embed_tokens.weight.to(torch.bfloat16))


def test_fp32_training_keeps_frozen_weights_fp32_and_limit_zero_keeps_all(tmp_path):
    target = tiny_target("llama")
    trainer = _eagle2_trainer(target, tmp_path / "out", seed=0, bf16=False, max_steps=4, save_steps=1,
                              save_total_limit=None)
    assert trainer.draft_module().embed_tokens.weight.dtype == torch.float32
    trainer.train()
    assert sorted(os.listdir(tmp_path / "out")) == [f"checkpoint-{k}" for k in range(1, 5)]


@pytest.mark.parametrize("kind", ["eagle3", "peagle", "dflash"])
def test_eagle3_checkpoint_has_no_embedding_and_resumes(tmp_path, kind):
    target = _helpers_eagle3.tiny_target()
    items = make_items(target, n=8)

    def trainer(out, seed):
        torch.manual_seed(seed)
        draft = draft_kinds.get(kind).build(target, draft_ids=torch.arange(0, 60), aux_layers=_helpers_eagle3.AUX)
        args = _args(TTTTrainingArguments, out, max_steps=4, noise_std=0.0, w_reg=0.0, w_cls=1.0, ttt_steps=2,
                     block_anchors=1)  # DFlash: one sampled anchor per conversation, drawn again on resume
        return TTTTrainer(model=draft, args=args, train_dataset=items, data_collator=TTTCollator(64),
                          target_head=target.lm_head.weight)

    first = trainer(tmp_path / "out", seed=0)
    assert first.draft_module().embed_tokens.weight.dtype == torch.bfloat16
    first.train()
    saved = load_file(str(tmp_path / "out" / "checkpoint-2" / "model.safetensors"))
    assert "embed_tokens.weight" not in saved and "lm_head.weight" in saved  # the draft's head is trained
    assert ("mask_hidden" in saved) == (kind == "peagle")  # P-EAGLE's learned mask feature is trained
    resumed = trainer(tmp_path / "out2", seed=1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    final, state = first.draft_module().state_dict(), resumed.draft_module().state_dict()
    for k, v in state.items():
        assert torch.allclose(v.float(), final[k].float(), atol=1e-5), k
