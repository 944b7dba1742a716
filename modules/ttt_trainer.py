"""Training-time test (TTT) trainer: EAGLE-3 (and EAGLE-1/2 with `arch="eagle2"`).

Subclasses modules/trainer.EagleTrainer; only the loss and the evaluation change.

Batches hold UNSHIFTED conversations (`TTTCollator`): tokens x_0..x_L, the target's last
(post-norm) hidden states f_0..f_L and, for EAGLE-3, the fused aux features a_0..a_L. With
`online=True` the features are computed here by the target (modules/features.target_features),
so training needs no feature storage.

Slots t = 0..L-1 as in modules/collate.py: slot t sees token x_{t+1} and feature f_t / a_t.
Step k (k = 0..n-1) at slot t reads token x_{t+1+k} and, for k > 0, the draft's own step-(k-1)
output at slot t; it predicts x_{t+2+k}, whose target distribution is softmax(head(f_{t+1+k})).
Attention per step: modules/ttt_attention.py (the paper's scheme). Positions shift by k.

Loss = sum_k decay^k * mean over valid slots of the soft cross-entropy between the draft's
distribution and the target's, both restricted to the DRAFT vocabulary (= forward KL up to a
constant). Valid: x_{t+2+k} is a trained token (loss mask) and the target's argmax at f_{t+1+k}
is inside the draft vocabulary. With arch="eagle2" the draft vocabulary is the full one and the
EAGLE-1 feature regression (w_reg * SmoothL1) is added per step.
"""
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from modules.trainer import EagleTrainer, EagleTrainingArguments, add_uniform_noise, soft_cross_entropy
from modules.ttt_attention import TTTCache, run_attention, step0_mask
from modules.ttt_attention import implementation as ttt_attention_implementation


@dataclass
class TTTTrainingArguments(EagleTrainingArguments):
    ttt_steps: int = field(default=7, metadata={"help": "unrolled draft steps (official EAGLE-3: 7)"})
    ttt_decay: float = field(default=0.8, metadata={"help": "step k's loss weight is decay**k"})


class TTTCollator:
    """Right-pads unshifted items: input_ids, loss_mask, attention_mask [B, L] and, when present,
    hidden_states [B, L, H] / aux_hidden_states [B, L, 3H]. Items are cut to max_length + 1
    tokens (max_length slots after the shift, as EagleCollator)."""

    FEATURES = ("hidden_states", "aux_hidden_states")

    def __init__(self, max_length=2048, pad_token_id=0):
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def __call__(self, items):
        items = [it for it in items if len(it["input_ids"]) >= 3]
        if not items:
            raise ValueError("batch has no conversation of at least 3 tokens")
        n = [min(len(it["input_ids"]), self.max_length + 1) for it in items]
        B, L = len(items), max(n)
        batch = {"input_ids": torch.full((B, L), self.pad_token_id, dtype=torch.long),
                 "loss_mask": torch.zeros(B, L, dtype=torch.long),
                 "attention_mask": torch.zeros(B, L, dtype=torch.long)}
        for key in self.FEATURES:
            if key in items[0]:
                x = items[0][key]
                batch[key] = torch.zeros(B, L, x.shape[-1], dtype=x.dtype)
        for b, (it, m) in enumerate(zip(items, n)):
            batch["input_ids"][b, :m] = it["input_ids"][:m].long()
            batch["loss_mask"][b, :m] = it["loss_mask"][:m].long()
            batch["attention_mask"][b, :m] = 1
            for key in self.FEATURES:
                if key in batch:
                    batch[key][b, :m] = it[key][:m]
        return batch


def shift_left(x, k, fill=0):
    """x[:, t + k] at slot t (dim 1), `fill` past the end."""
    if k == 0:
        return x
    pad = torch.full_like(x[:, :k], fill)
    return torch.cat([x[:, k:], pad], dim=1)


def eagle2_ttt_step(draft, input_ids, hidden_states, cache, mask0, step):
    """One TTT step of an EAGLE-1/2 draft (modules/eagle_draft.EagleDraft): fc(cat(embed, feature))
    then its Llama-like decoder layer with TTT attention (input_layernorm is Identity there)."""
    x = draft.fc(torch.cat((draft.embed_tokens(input_ids).to(hidden_states.dtype), hidden_states), dim=-1))
    layer = draft.layers[0]
    pos = torch.arange(step, step + x.shape[1], device=x.device).unsqueeze(0)
    pos_emb = draft.rotary_emb(x, pos)
    impl = ttt_attention_implementation(draft.config)
    x = x + run_attention(layer.self_attn, layer.input_layernorm(x), pos_emb, cache, mask0, impl)
    return x + layer.mlp(layer.post_attention_layernorm(x))


@torch.no_grad()
def target_logprobs(features, head_weight, draft_ids=None, chunk=1024, argmax_head=None):
    """(log-probs over the draft vocab [N, Nd] float32, full-vocab argmax [N]) of head(features) [N, H].

    draft_ids None = the full vocabulary (EAGLE-1/2): one matmul serves both. Otherwise only the
    draft-vocab rows of the head are needed for the distribution; the full-vocab logits serve only
    the argmax (is the target's top token in the draft vocab?), so they may come from a cheaper
    `argmax_head` (e.g. a bf16 copy; on bf16 CPUs/GPUs that matmul is several times faster).
    Row chunks keep [N, V] logits from existing at once.
    """
    rows = head_weight if draft_ids is None else head_weight[draft_ids]
    argmax_head = head_weight if argmax_head is None else argmax_head
    logp, top = [], []
    for part in features.split(chunk):
        logits = (part.to(rows.dtype) @ rows.T).float()
        if draft_ids is None:
            top.append(logits.argmax(-1))
        else:
            top.append((part.to(argmax_head.dtype) @ argmax_head.T).argmax(-1))
        logp.append(torch.log_softmax(logits, dim=-1))
    if not logp:
        n = head_weight.shape[0] if draft_ids is None else len(draft_ids)
        return features.new_zeros(0, n, dtype=torch.float32), features.new_zeros(0, dtype=torch.long)
    return torch.cat(logp), torch.cat(top)


class TTTTrainer(EagleTrainer):
    """EagleTrainer with the training-time-test loss.

    target_head: the target's frozen lm_head weight [V, H] (EAGLE-3 drafts train their own head,
      so the target distribution needs the original); None = the draft's own head (EAGLE-1/2).
    target: the target model, needed for online=True (features computed in the loop).
    """

    def __init__(self, *args, target_head=None, target=None, online=False, **kwargs):
        super().__init__(*args, **kwargs)
        draft = self.draft_module()
        self.is_eagle3 = hasattr(draft, "ttt_step")
        if target_head is None:
            if self.is_eagle3:
                raise ValueError("an EAGLE-3 draft needs target_head (the target's frozen lm_head weight)")
            target_head = draft.lm_head.weight
        self.target_head = target_head.detach().to(self.args.device)
        # The full-vocab matmul only feeds an argmax: bf16 is enough, and much faster on bf16 hardware.
        self.argmax_head = self.target_head.to(torch.bfloat16) if self.is_eagle3 else None
        self.target = target
        self.online = online
        if online and target is None:
            raise ValueError("online training needs the target model")

    # ---- features -------------------------------------------------------------------------
    def _features(self, draft, inputs):
        """(step-0 input features [B,L,*], last hidden [B,L,H]) from the batch or the target."""
        if self.online:
            from modules.features import target_features
            last, aux = target_features(self.target, inputs["input_ids"], inputs["attention_mask"],
                                        draft.aux_layers if self.is_eagle3 else None)
        else:
            last, aux = inputs["hidden_states"], inputs.get("aux_hidden_states")
            if self.is_eagle3 and aux is None:
                raise ValueError("EAGLE-3 training needs fused features (aux_hidden_states): generate the data "
                                 "with generate_data_fused_features.py, or train with --online")
        return (aux if self.is_eagle3 else last), last

    def _draft_ids(self, draft):
        """(draft ids or None = full vocabulary, t2d mask)."""
        if self.is_eagle3:
            return draft.draft_ids, draft.t2d
        return None, torch.ones(self.target_head.shape[0], dtype=torch.bool, device=self.target_head.device)

    # ---- the unrolled draft ---------------------------------------------------------------------
    def unroll(self, model, inputs, steps):
        """Run `steps` TTT steps. Returns a dict with per-step outputs and the shifted labels."""
        draft = self.draft_module(model)
        dtype = draft.fc.weight.dtype
        feats, last = self._features(draft, inputs)
        ids, lm, am = inputs["input_ids"], inputs["loss_mask"], inputs["attention_mask"]
        feats, last = feats[:, :-1].to(dtype), last[:, 1:]         # slot t: a_t / f_t ; target f_{t+1}
        slot_ids, slot_am = ids[:, 1:], am[:, 1:]                  # slot t reads x_{t+1}
        slot_mask = shift_left(lm, 2)[:, :-1]                      # ... and predicts x_{t+2}
        if model.training and self.args.noise_std > 0:
            feats = add_uniform_noise(feats, slot_am, self.args.noise_std)
        mask0 = step0_mask(slot_am, slot_ids.shape[1], slot_ids.device)
        cache, h, outs = TTTCache(), feats, []
        for k in range(steps):
            step_ids = shift_left(slot_ids, k)
            if self.is_eagle3:
                h = draft.ttt_step(step_ids, h, cache, mask0, k)
            else:
                h = eagle2_ttt_step(draft, step_ids, h, cache, mask0, k)
            outs.append(h)
        return {"draft": draft, "outs": outs, "last": last, "slot_mask": slot_mask, "slot_ids": slot_ids,
                "slot_am": slot_am}

    def eagle_loss(self, model, inputs):
        args = self.args
        u = self.unroll(model, inputs, args.ttt_steps)
        draft, last, slot_mask = u["draft"], u["last"], u["slot_mask"]
        draft_ids, t2d = self._draft_ids(draft)
        # Target distributions once, only at trained positions (a slot's step k reads slot t+k).
        sel_all = slot_mask.bool()
        tgt_logp, tgt_top = target_logprobs(last[sel_all], self.target_head, draft_ids, argmax_head=self.argmax_head)
        row = torch.full(slot_mask.shape, -1, dtype=torch.long, device=slot_mask.device)
        row[sel_all] = torch.arange(int(sel_all.sum()), device=row.device)
        in_vocab = t2d[tgt_top]
        total = 0.0
        metrics = defaultdict(float)
        for k, h in enumerate(u["outs"]):
            r = shift_left(row, k, fill=-1)
            valid = r >= 0
            valid[valid.clone()] = in_vocab[r[valid]]
            rows = r[valid]
            n = valid.sum()
            logits = draft.compute_logits(h[valid])
            ce = soft_cross_entropy(logits, tgt_logp[rows])
            step_loss = args.w_cls * ce.sum()
            if args.w_reg > 0:
                reg = F.smooth_l1_loss(h[valid].float(), shift_left(last, k)[valid].float(), reduction="none").mean(-1)
                step_loss = step_loss + args.w_reg * reg.sum()
                metrics[f"s{k}_reg"] += float(reg.detach().sum())
            total = total + (args.ttt_decay ** k) * step_loss / n.clamp(min=1)
            with torch.no_grad():
                hit = (logits.argmax(-1) == tgt_logp[rows].argmax(-1)).sum()
            metrics[f"s{k}_loss"] += float(ce.detach().sum())
            metrics[f"s{k}_hit"] += float(hit)
            metrics[f"s{k}_n"] += float(n)
        # the base trainer's keys: step 0 (cls/top1), token counts
        metrics.update(cls_sum=metrics["s0_loss"], reg_sum=metrics.get("s0_reg", 0.0), top1=metrics["s0_hit"],
                       n_trained=metrics["s0_n"], n_tokens=float(inputs["attention_mask"].sum()))
        return total, dict(metrics)

    # ---- logging ------------------------------------------------------------------------------
    @staticmethod
    def summarize(sums, prefix=""):
        n0 = max(sums.get("n_trained", 0.0), 1.0)
        out = {f"{prefix}cls_loss": sums.get("cls_sum", 0.0) / n0, f"{prefix}top1_acc": sums.get("top1", 0.0) / n0}
        if sums.get("reg_sum"):
            out[f"{prefix}reg_loss"] = sums["reg_sum"] / n0
        k = 0
        while f"s{k}_n" in sums:
            n = max(sums[f"s{k}_n"], 1.0)
            out[f"{prefix}step{k}_loss"] = sums[f"s{k}_loss"] / n
            out[f"{prefix}step{k}_acc"] = sums[f"s{k}_hit"] / n
            k += 1
        if "sim_count" in sums:
            out[f"{prefix}tau_sim"] = 1.0 + sums["sim_accepted"] / max(sums["sim_count"], 1.0)
        return out

    # ---- evaluation: simulated acceptance from the same unroll ------------------------------------
    @torch.no_grad()
    def eval_batch(self, model, inputs):
        """Loss metrics plus a simulated chain acceptance (as modules/trainer.simulated_acceptance):
        while the chain is alive, the draft's tokens equal the data tokens, so the unrolled TTT
        steps (which read data tokens) are exactly the draft's chain at decoding time."""
        _, metrics = self.eagle_loss(model, inputs)
        steps = max(self.args.sim_steps, 1)
        u = self.unroll(model, inputs, steps)
        draft, last = u["draft"], u["last"]
        mask = u["slot_mask"].bool()
        nxt = shift_left(u["slot_ids"], 1, fill=-1)  # x_{t+2}: the data token slot t predicts
        nxt = torch.where(shift_left(u["slot_am"], 1) > 0, nxt, torch.full_like(nxt, -1))
        greedy = (last.to(self.target_head.dtype) @ self.target_head.T).argmax(-1)
        greedy = torch.where(nxt >= 0, greedy, torch.full_like(greedy, -2))
        alive = torch.ones_like(mask)
        accepted = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        for k, h in enumerate(u["outs"]):
            tok = draft.compute_logits(h).argmax(-1)
            if self.is_eagle3:
                tok = draft.to_target_ids(tok)
            g, d = shift_left(greedy, k, -2), shift_left(nxt, k, -1)
            ok = alive & (tok == g)
            accepted += ok.long()
            alive = ok & (d == g)
        metrics.update(sim_accepted=float(accepted[mask].sum()), sim_count=float(mask.sum()))
        return metrics
