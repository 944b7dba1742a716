"""TTT trainer: offline and online features agree, tiny training runs lower the loss (EAGLE-3 and
EAGLE-2 + TTT), per-step metrics and the simulated acceptance are logged."""
import torch

from modules.draft.eagle_draft import EagleDraft
from modules.draft.eagle3_draft import Eagle3Draft
from modules.data.features import target_features
from modules.training.ttt_trainer import TTTCollator, TTTTrainer, TTTTrainingArguments
from tests._helpers_eagle3 import AUX, VOCAB, tiny_target


def make_items(target, n=8, seed=0, features=True):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        T = int(torch.randint(12, 25, (1,), generator=g))
        # a repetitive token pattern: something a one-layer draft can learn quickly
        ids = (torch.arange(T) * int(torch.randint(1, 5, (1,), generator=g)) + i) % 40 + 3
        mask = torch.zeros(T, dtype=torch.long)
        mask[3:] = 1
        item = {"input_ids": ids, "loss_mask": mask, "row_id": i}
        if features:
            last, aux = target_features(target, ids[None], None, AUX)
            item["hidden_states"], item["aux_hidden_states"] = last[0], aux[0]
        items.append(item)
    return items


def make_trainer(tmp_path, draft, target, items, online=False, eagle3=True, steps=30):
    args = TTTTrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, logging_steps=10, report_to=[], save_strategy="no", use_cpu=True,
        warmup_steps=0, noise_std=0.0, w_reg=0.0 if eagle3 else 1.0, w_cls=1.0 if eagle3 else 0.1,
        ttt_steps=3, sim_steps=3, dataloader_num_workers=0, seed=0)
    head = target.lm_head.weight if eagle3 else None
    return TTTTrainer(model=draft, args=args, train_dataset=items, eval_dataset=items, data_collator=TTTCollator(64),
                      target_head=head, target=target if online else None, online=online)


def test_online_features_equal_stored_features(tmp_path):
    target = tiny_target()
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, VOCAB, 2), aux_layers=AUX)
    stored = make_items(target, n=3)
    online = [{k: v for k, v in it.items() if "hidden" not in k} for it in stored]
    tr_off = make_trainer(tmp_path / "a", draft, target, stored)
    tr_on = make_trainer(tmp_path / "b", draft, target, online, online=True)
    coll = TTTCollator(64)
    loss_off, m_off = tr_off.eagle_loss(draft, coll(stored))
    loss_on, m_on = tr_on.eagle_loss(draft, coll(online))
    torch.testing.assert_close(loss_on, loss_off, atol=1e-4, rtol=1e-4)
    assert m_on["s2_n"] == m_off["s2_n"] > 0
    # later steps see fewer valid positions (the sequence end) and never more
    assert m_off["s0_n"] >= m_off["s1_n"] >= m_off["s2_n"]


def test_eagle3_ttt_training_lowers_loss(tmp_path):
    target = tiny_target()
    items = make_items(target)
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, 60), aux_layers=AUX)
    trainer = make_trainer(tmp_path, draft, target, items)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    for k in range(3):
        assert after[f"eval_step{k}_loss"] < before[f"eval_step{k}_loss"]
    assert after["eval_step0_acc"] > before["eval_step0_acc"]
    assert after["eval_tau_sim"] >= 1.0
    logged = [h for h in trainer.state.log_history if "step2_acc" in h and "loss" in h]
    assert logged, "per-step accuracy is logged during training"


def test_eagle2_arch_ttt_training_lowers_loss(tmp_path):
    target = tiny_target()
    items = make_items(target)
    torch.manual_seed(0)
    draft = EagleDraft.from_target(target)
    trainer = make_trainer(tmp_path, draft, target, items, eagle3=False)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_step0_loss"] < before["eval_step0_loss"]
    assert after["eval_step2_loss"] < before["eval_step2_loss"]
    assert after["eval_reg_loss"] < before["eval_reg_loss"]


def naive_chain_acceptance(draft, head, item, steps):
    """Decode-time simulation, one origin at a time with a KV cache: the draft's greedy chain from
    slot t, accepted while it matches the target's greedy token (and the data stays on it)."""
    ids, lm = item["input_ids"], item["loss_mask"]
    last, fused = item["hidden_states"].float(), item["aux_hidden_states"].float()
    L = len(ids)
    greedy = (last @ head.T).argmax(-1)  # greedy[p]: target's choice for token p+1
    total = count = 0
    for t in range(L - 2):  # slot t reads x_{t+1}, predicts x_{t+2}
        if not lm[t + 2]:
            continue
        count += 1
        with torch.no_grad():
            out, cache = draft(ids[None, 1:t + 2], fused[None, :t + 1], use_cache=True)
            h = out[:, -1:]
            for s in range(steps):
                p = t + 1 + s  # the target position whose greedy token the chain must hit
                if p >= L - 1:
                    break
                tok = draft.to_target_ids(draft.compute_logits(h).argmax(-1))
                if int(tok) != int(greedy[p]):
                    break
                total += 1
                if int(ids[p + 1]) != int(greedy[p]):
                    break  # off the data path: the stored features no longer apply
                h, cache = draft(tok.view(1, 1), h, past_key_values=cache, use_cache=True, fused=False)
    return total, count


def test_simulated_tau_equals_sequential_decoding(tmp_path):
    target = tiny_target()
    items = make_items(target, n=4)
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, 60), aux_layers=AUX)
    trainer = make_trainer(tmp_path, draft, target, items, steps=25)
    trainer.train()
    draft.eval()
    sums = trainer.eval_batch(draft, TTTCollator(64)(items))
    expected = [naive_chain_acceptance(draft, target.lm_head.weight, it, trainer.args.sim_steps) for it in items]
    assert sums["sim_count"] == sum(c for _, c in expected)
    assert sums["sim_accepted"] == sum(a for a, _ in expected)
    assert sums["sim_accepted"] > 0  # the check is not vacuous


def test_topk_distillation_term(tmp_path):
    from modules.training.ttt_trainer import topk_distillation

    # by hand: target p = (0.5, 0.3, 0.2) over 3 tokens, K = 2 keeps tokens 0 and 1
    target_logp = torch.tensor([[0.5, 0.3, 0.2]]).log()
    pred = torch.tensor([[1.0, 2.0, 3.0]])
    logq = torch.log_softmax(pred, -1)[0]
    expected = -(0.5 * logq[0] + 0.3 * logq[1])
    torch.testing.assert_close(topk_distillation(pred, target_logp, 2)[0], expected)
    # K >= vocabulary: the full soft cross-entropy
    full = -(target_logp.exp() * torch.log_softmax(pred, -1)).sum()
    torch.testing.assert_close(topk_distillation(pred, target_logp, 10)[0], full)

    # In the trainer: with K = the draft vocabulary and weight w, the loss is (1 + w) x the plain one.
    target = tiny_target()
    items = make_items(target, n=3)
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(0, 60), aux_layers=AUX).eval()
    plain = make_trainer(tmp_path / "a", draft, target, items)
    hass = make_trainer(tmp_path / "b", draft, target, items)
    hass.args.topk_distill, hass.args.topk_distill_weight = 60, 0.5
    batch = TTTCollator(64)(items)
    loss_plain, _ = plain.eagle_loss(draft, batch)
    loss_hass, _ = hass.eagle_loss(draft, batch)
    torch.testing.assert_close(loss_hass, 1.5 * loss_plain)
    hass.args.topk_distill = 3  # a real top-K: a smaller, different term
    loss_top3, _ = hass.eagle_loss(draft, batch)
    assert loss_plain < loss_top3 < loss_hass


def _eagle3(target):
    return Eagle3Draft.from_target(target, draft_ids=torch.arange(0, 60), aux_layers=AUX)


def test_freeze_head_keeps_the_head_bit_equal_and_trains_the_rest(tmp_path):
    """--freeze-head: the draft's lm_head (the target's rows) is bit-equal after training while fc moves; the
    control (the flag off) moves the head too."""
    target = tiny_target()
    items = make_items(target)
    for freeze in (True, False):
        draft = _eagle3(target)
        head0, fc0 = draft.lm_head.weight.detach().clone(), draft.fc.weight.detach().clone()
        trainer = make_trainer(tmp_path / str(freeze), draft, target, items, steps=3)
        trainer.args.freeze_head = freeze
        trainer = TTTTrainer(model=draft, args=trainer.args, train_dataset=items, data_collator=TTTCollator(64),
                             target_head=target.lm_head.weight)
        trainer.train()
        assert not torch.equal(draft.fc.weight, fc0)
        assert torch.equal(draft.lm_head.weight, head0) == freeze
        trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        assert ("draft.lm_head.weight" in trained) != freeze


def test_train_all_tokens_scores_the_prompt_too(tmp_path):
    """--train-all-tokens: step 0 scores every slot whose next-next token exists (attention mask), not only the
    loss-masked ones; the control scores the loss-masked ones."""
    target = tiny_target()
    items = make_items(target, n=3)
    for it in items:  # a long prompt: the first half of each conversation is not trained
        it["loss_mask"][:len(it["input_ids"]) // 2] = 0
    draft = Eagle3Draft.from_target(target, draft_ids=torch.arange(VOCAB), aux_layers=AUX).eval()
    batch = TTTCollator(64)(items)
    replies = make_trainer(tmp_path / "a", draft, target, items)
    everything = make_trainer(tmp_path / "b", draft, target, items)
    everything.args.train_all_tokens = True
    _, m_replies = replies.eagle_loss(draft, batch)
    _, m_all = everything.eagle_loss(draft, batch)
    # slot t is scored when token t+2 exists (and is trained, without the flag): the draft vocab is all of it
    assert int(m_replies["s0_n"]) == sum(int(it["loss_mask"][2:].sum()) for it in items)
    assert int(m_all["s0_n"]) == sum(len(it["input_ids"]) - 2 for it in items) > int(m_replies["s0_n"])


def test_total_variation_by_hand_and_in_the_loss(tmp_path):
    from modules.training.ttt_trainer import total_variation

    target_logp = torch.tensor([[0.5, 0.3, 0.2]]).log()
    pred = torch.tensor([[0.6, 0.2, 0.2]]).log()  # softmax of log-probs gives them back
    torch.testing.assert_close(total_variation(pred, target_logp)[0], torch.tensor(0.1))
    torch.testing.assert_close(total_variation(target_logp, target_logp)[0], torch.tensor(0.0))
    # in the trainer: --w-cls 0 --tv-weight 1 gives a loss in [0, sum_k decay^k] (TV is in [0, 1]) that trains
    target = tiny_target()
    items = make_items(target)
    draft = _eagle3(target)
    trainer = make_trainer(tmp_path, draft, target, items, steps=20)
    trainer.args.w_cls, trainer.args.tv_weight = 0.0, 1.0
    batch = TTTCollator(64)(items[:4])
    before, _ = trainer.eagle_loss(draft.eval(), batch)
    assert 0 < before.item() <= sum(trainer.args.ttt_decay ** k for k in range(3))
    trainer.train()
    after, _ = trainer.eagle_loss(draft.eval(), batch)
    assert after < before


def test_expected_accepted_length_from_the_step_accuracies(tmp_path):
    from modules.training.ttt_trainer import expected_accepted_length

    assert expected_accepted_length([]) == 1.0
    assert expected_accepted_length([0.5, 0.5, 0.0, 1.0]) == 1 + 0.5 + 0.25
    target = tiny_target()
    items = make_items(target, n=4)
    metrics = make_trainer(tmp_path, _eagle3(target), target, items).evaluate()
    accs = [metrics[f"eval_step{k}_acc"] for k in range(3)]
    assert abs(metrics["eval_eal"] - expected_accepted_length(accs)) < 1e-4


def test_muon_optimizer_trains_the_hidden_matrices_and_resumes(tmp_path):
    """--optimizer muon: Muon holds the 2-D hidden weights (fc, attention, MLP), AdamW the rest that trains (norms,
    the draft head); the loss goes down; the state round-trips through state_dict (a resume). Control: AdamW's run
    has no Muon."""
    from modules.training.optimizers import MuonWithAdamW, muon_parameters

    target = tiny_target()
    items = make_items(target)
    draft = _eagle3(target)
    muon, adamw = muon_parameters(draft)
    names = {id(p): n for n, p in draft.named_parameters()}
    assert {names[id(p)] for p in muon} >= {"fc.weight", "midlayer.self_attn.q_proj.weight"}
    assert "lm_head.weight" in {names[id(p)] for p in adamw} and all(p.ndim == 2 for p in muon)
    trainer = make_trainer(tmp_path, draft, target, items, steps=20)
    trainer.args.optimizer = "muon"
    before = trainer.evaluate()
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      MuonWithAdamW)
    assert trainer.evaluate()["eval_step0_loss"] < before["eval_step0_loss"]
    opt = MuonWithAdamW(*muon_parameters(draft), lr=1e-3)
    draft.zero_grad()
    trainer.eagle_loss(draft.train(), TTTCollator(64)(items[:4]))[0].backward()
    opt.step()
    again = MuonWithAdamW(*muon_parameters(draft), lr=1e-3)
    again.load_state_dict(opt.state_dict())
    m0 = opt.inner[0].state[muon[0]]["momentum_buffer"]
    torch.testing.assert_close(again.inner[0].state[again.inner[0].param_groups[0]["params"][0]]["momentum_buffer"],
                               m0)
    control = make_trainer(tmp_path / "adamw", _eagle3(target), target, items, steps=1)
    control.train()
    assert not isinstance(control.optimizer.optimizer, MuonWithAdamW)
