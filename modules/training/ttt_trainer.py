"""Training-time test (TTT) trainer of every registered draft kind (EAGLE-3, P-EAGLE, DFlash, EAGLE-1/2).

Subclasses modules/training/eagle_trainer.EagleTrainer; only the loss and the evaluation change.

Batches hold UNSHIFTED conversations (`TTTCollator`): tokens x_0..x_L, the target's last
(post-norm) hidden states f_0..f_L and, for EAGLE-3, the fused aux features a_0..a_L. With
`online=True` the features are computed here by the target (modules/data/features.target_features),
so training needs no feature storage.

Slots t = 0..L-1 as in modules/data/collate.py: slot t sees token x_{t+1} and feature f_t / a_t.
Step k (k = 0..n-1) at slot t reads token x_{t+1+k} and, for k > 0, the draft's own step-(k-1)
output at slot t; it predicts x_{t+2+k}, whose target distribution is softmax(head(f_{t+1+k})).
Attention per step: modules/draft/ttt_attention.py (the paper's scheme). Positions shift by k.

Loss = sum_k decay^k * mean over valid slots of the soft cross-entropy between the draft's
distribution and the target's, both restricted to the DRAFT vocabulary (= forward KL up to a
constant), plus, with topk_distill = K > 0, HASS's top-K term (the same sum over the target's K
most likely tokens only, weight topk_distill_weight).
Valid: x_{t+2+k} is a trained token (loss mask) and the target's argmax at f_{t+1+k}
is inside the draft vocabulary. A kind that trains one block per anchor slot (`anchored`: DFlash)
trains, per conversation and step, only the slots of `block_anchors` sampled anchors (evaluation: all).
With arch="eagle2" the draft vocabulary is the full one and the
EAGLE-1 feature regression (w_reg * SmoothL1) is added per step.

The trainer's model is TTTUnroll(draft): the unroll and the draft head run inside its forward, so
DDP (torchrun / accelerate) sees every trained weight used in the wrapped forward and all-reduces the
gradients. Checkpoints and exports save the draft alone (draft_module()).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from modules.draft.kinds import kind_of
from modules.training.eagle_trainer import EagleTrainer, EagleTrainingArguments, add_uniform_noise, soft_cross_entropy
from modules.draft.ttt_attention import TTTCache, step0_mask
from modules.training.settings import TTTSettings


@dataclass
class TTTTrainingArguments(EagleTrainingArguments, TTTSettings):
    """EagleTrainingArguments + the TTT settings (TTTSettings, declared once in modules/training/settings.py)."""


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


@torch.no_grad()
def topk_distillation(pred_logits, target_logp, k):
    """Per-row -sum over the target's K most likely tokens of p_target * log p_pred (HASS's harmonized
    objective: the loss spent where acceptance is decided, on the tokens a tree would propose)."""
    top_logp, top = target_logp.float().topk(min(k, target_logp.shape[-1]), dim=-1)
    logq = torch.log_softmax(pred_logits.float(), dim=-1).gather(-1, top)
    return -(top_logp.exp() * logq).sum(-1)


def total_variation(pred_logits, target_logp):
    """Per-row 0.5 * sum |p_target - p_draft| over the draft vocabulary: 1 - TV is the probability that a
    token sampled from the draft is accepted by speculative sampling against the target."""
    return 0.5 * (torch.softmax(pred_logits.float(), dim=-1) - target_logp.float().exp()).abs().sum(-1)


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


def sample_anchors(candidates, n, generator):
    """bool [B, T]: n of each row's candidate slots (all of them in a row with n or fewer), uniformly without
    replacement. The draw comes from `generator` on the CPU, so it is the same on every device."""
    if n <= 0 or n >= candidates.shape[1]:
        return candidates
    score = torch.rand(candidates.shape, generator=generator).to(candidates.device).masked_fill(~candidates, -1.0)
    return torch.zeros_like(candidates).scatter_(1, score.topk(n, dim=1).indices, True) & candidates


def expected_accepted_length(step_accuracies) -> float:
    """1 + sum over k of the product of the step accuracies up to k: a chain's tokens per cycle (the bonus token
    included) if each step were right independently with its teacher-forced accuracy."""
    total, alive = 1.0, 1.0
    for acc in step_accuracies:
        alive *= acc
        total += alive
    return total


class TTTUnroll(nn.Module):
    """What TTTTrainer trains, and what DDP / FSDP / DeepSpeed wrap: its forward runs the whole
    unrolled draft and the draft's head, so every trained weight is used inside the wrapped
    forward and its gradient is synchronised across ranks. The draft is `.draft`; checkpoints and
    exports save the draft alone, in its own layout (TTTTrainer.draft_module)."""

    def __init__(self, draft):
        super().__init__()
        self.draft = draft
        self.anchored = kind_of(draft).anchored  # the kind decides: a whole block per anchor in one pass (DFlash)

    def forward(self, slot_ids, features, slot_am, steps, select):
        """`steps` TTT steps over every slot (slot_ids [B,T], step-0 input features [B,T,*],
        attention mask [B,T]). select: index tensors (k, b, t) [N] naming the (step, row, slot)
        outputs wanted. Returns (draft outputs [N, h], draft logits [N, draft vocab])."""
        draft = self.draft
        if self.anchored:  # the draft fills each anchor's whole block in one pass: its block_unroll
            h = draft.block_unroll(slot_ids, features, slot_am, steps, select)
            return h, draft.compute_logits(h)
        mask0 = step0_mask(slot_am, slot_ids.shape[1], slot_ids.device)
        cache, h, outs = TTTCache(), features, []
        for k in range(steps):
            step_ids = shift_left(slot_ids, k)
            h = draft.ttt_step(step_ids, h, cache, mask0, k)
            outs.append(h)
        k, b, t = select
        h = torch.stack(outs)[k, b, t]
        return h, draft.compute_logits(h)


class TTTTrainer(EagleTrainer):
    """EagleTrainer with the training-time-test loss. The trainer's model is TTTUnroll(draft).

    target_head: the target's frozen lm_head weight [V, H] (EAGLE-3 drafts train their own head,
      so the target distribution needs the original); None = the draft's own head (EAGLE-1/2).
    target: needed for online=True (features computed in the loop): the target model, or the client of a
      feature server (modules/data/feature_server.FeatureClient: the features from one engine process).

    Host syncs per micro-step: two (the number of trained slots and of scored (step, slot) pairs
    set tensor shapes); metrics stay on the device until a logging step (EagleTrainer.log).
    """

    def __init__(self, model=None, *args, target_head=None, target=None, online=False, **kwargs):
        if model is not None and not isinstance(model, TTTUnroll):
            model = TTTUnroll(model)
        if model is not None and getattr(kwargs.get("args"), "freeze_head", False):
            # --freeze-head: before the base trainer casts frozen weights and the optimizer picks the trained ones
            model.draft.lm_head.requires_grad_(False)
        super().__init__(model, *args, **kwargs)
        draft = self.draft_module()
        self.kind = kind_of(draft)  # modules/draft/kinds.py: which features, which vocabulary
        if target_head is None:
            if self.kind.own_vocab:
                raise ValueError(f"an {self.kind.name} draft needs target_head (the target's frozen lm_head weight)")
            target_head = draft.lm_head.weight
        self.target_head = target_head.detach().to(self.args.device)
        # The full-vocab matmul only feeds an argmax: bf16 is enough, and much faster on bf16 hardware.
        self.argmax_head = self.target_head.to(torch.bfloat16) if self.kind.own_vocab else None
        self.target = target
        self.online = online
        if online and target is None:
            raise ValueError("online training needs the target model")

    def draft_module(self, model=None):
        """The draft itself (inside TTTUnroll, inside DDP & co.): what is saved, exported, evaluated."""
        module = super().draft_module(model)
        return module.draft if isinstance(module, TTTUnroll) else module

    def unroller(self, model):
        """The module whose forward runs the unroll: the trainer's model as given (DDP-wrapped in
        distributed training), or a bare draft (evaluation, tests) wrapped on the spot."""
        return model if isinstance(self.accelerator.unwrap_model(model), TTTUnroll) else TTTUnroll(model)

    # ---- features -------------------------------------------------------------------------
    def _features(self, draft, inputs):
        """(step-0 input features [B,L,*], last hidden [B,L,H]) from the batch or the target."""
        if self.online:
            from modules.data.feature_server import FeatureClient
            from modules.data.features import target_features
            layers = draft.aux_layers if self.kind.fused_features else None
            if isinstance(self.target, FeatureClient):  # one engine process computes them (--engine vllm)
                last, aux = self.target.features(inputs["input_ids"], inputs["attention_mask"], layers)
            else:
                last, aux = target_features(self.target, inputs["input_ids"], inputs["attention_mask"], layers)
        else:
            last, aux = inputs["hidden_states"], inputs.get("aux_hidden_states")
            if self.kind.fused_features and aux is None:
                raise ValueError(f"{self.kind.name} training needs fused features (aux_hidden_states): generate the "
                                 "data with generate_data_fused_features.py, or train with --online")
        return (aux if self.kind.fused_features else last), last

    def _draft_ids(self, draft):
        """(draft ids or None = full vocabulary, t2d mask)."""
        if self.kind.own_vocab:
            return draft.draft_ids, draft.t2d
        return None, torch.ones(self.target_head.shape[0], dtype=torch.bool, device=self.target_head.device)

    def slots(self, draft, inputs, noise):
        """The batch per slot t (no gradient): step-0 input `feats` a_t / f_t [B,T,*] (noised when
        `noise`), data token `ids` x_{t+1}, attention mask `am`, `mask` = x_{t+2} is trained, and
        `last` = f_{t+1}, whose head gives the target distribution of x_{t+2}."""
        dtype = draft.fc.weight.dtype
        feats, last = self._features(draft, inputs)
        ids, lm, am = inputs["input_ids"], inputs["loss_mask"], inputs["attention_mask"]
        scored = am if self.args.train_all_tokens else lm  # --train-all-tokens: the prompt's tokens too
        s = {"feats": feats[:, :-1].to(dtype), "last": last[:, 1:], "ids": ids[:, 1:], "am": am[:, 1:],
             "mask": shift_left(scored, 2)[:, :-1].bool()}
        if noise and self.args.noise_std > 0:
            s["feats"] = add_uniform_noise(s["feats"], s["am"], self.args.noise_std)
        return s

    # ---- the loss -------------------------------------------------------------------------------
    def anchor_generator(self):
        """The random generator of this micro-step's anchor sample, seeded by (--seed, optimizer step, micro-step,
        rank): a rerun draws the same anchors, and a resumed run the ones the uninterrupted run drew."""
        step = self.state.global_step
        if getattr(self, "_anchor_step", None) != step:
            self._anchor_step, self._anchor_micro = step, 0
        self._anchor_micro += 1
        seed = ((self.args.seed * 1_000_003 + step) * 1_009 + self._anchor_micro) * 1_013 + self.args.process_index
        return torch.Generator().manual_seed(seed)

    def eagle_loss(self, model, inputs):
        draft = self.draft_module(model)
        return self.ttt_loss(model, self.slots(draft, inputs, noise=model.training),
                             self.kind.unroll_steps(draft, self.args.ttt_steps))

    def ttt_loss(self, model, s, steps):
        """(loss, metric sums as device tensors) of `steps` unrolled steps over the slots `s`."""
        args = self.args
        draft = self.draft_module(model)
        draft_ids, t2d = self._draft_ids(draft)
        # Target distributions once, only at trained slots (host sync: their number).
        b, t = s["mask"].nonzero(as_tuple=True)
        tgt_logp, tgt_top = target_logprobs(s["last"][b, t], self.target_head, draft_ids, argmax_head=self.argmax_head)
        row = torch.full(s["mask"].shape, -1, dtype=torch.long, device=b.device)
        row[b, t] = torch.arange(len(b), device=b.device)
        # Step k at slot t is scored against slot t+k's target distribution when slot t+k is trained
        # and the target's top token there is in the draft vocabulary (row -1 reads the appended False).
        rows = torch.stack([shift_left(row, k, fill=-1) for k in range(steps)])  # [steps, B, T]
        in_vocab = torch.cat([t2d[tgt_top], t2d.new_zeros(1)])
        valid = in_vocab[rows]
        if model.training and self.kind.anchored and args.block_anchors > 0:
            # a block per anchor slot t (DFlash): train the blocks of block_anchors sampled anchors per conversation,
            # among those with a scored step; the per-step means below are over the sampled (step, anchor) pairs
            valid = valid & sample_anchors(valid.any(0), args.block_anchors, self.anchor_generator())
        k, b, t = valid.nonzero(as_tuple=True)  # host sync: the number of scored (step, slot) pairs
        h, logits = self.unroller(model)(s["ids"], s["feats"], s["am"], steps, (k, b, t))
        r = rows[k, b, t]
        ce = soft_cross_entropy(logits, tgt_logp[r])
        per_row = args.w_cls * ce
        if args.topk_distill > 0:
            per_row = per_row + args.topk_distill_weight * topk_distillation(logits, tgt_logp[r], args.topk_distill)
        if args.tv_weight > 0:
            per_row = per_row + args.tv_weight * total_variation(logits, tgt_logp[r])
        if args.w_reg > 0:
            reg = F.smooth_l1_loss(h.float(), s["last"][b, t + k].float(), reduction="none").mean(-1)
            per_row = per_row + args.w_reg * reg
        n = valid.sum((1, 2))
        weight = args.ttt_decay ** torch.arange(steps, device=n.device) / n.clamp(min=1)
        total = (weight[k] * per_row).sum()  # sum_k decay^k * mean over step k's scored slots

        def per_step(x):
            return torch.zeros(steps, device=x.device).index_add_(0, k, x.detach().float())

        loss_k = per_step(ce)
        hit_k = per_step(logits.detach().argmax(-1) == tgt_logp.argmax(-1)[r])
        reg_k = per_step(reg) if args.w_reg > 0 else None
        metrics = {}
        for i in range(steps):
            metrics.update({f"s{i}_loss": loss_k[i], f"s{i}_hit": hit_k[i], f"s{i}_n": n[i]})
            if reg_k is not None:
                metrics[f"s{i}_reg"] = reg_k[i]
        # the base trainer's keys: step 0 (cls/top1), token counts
        metrics.update(cls_sum=loss_k[0], top1=hit_k[0], n_trained=n[0], n_tokens=s["am"].sum())
        if reg_k is not None:
            metrics["reg_sum"] = reg_k[0]
        return total, metrics

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
        if k:  # expected accepted length of a chain: 1 + sum_k prod_{j<=k} step j's accuracy (speculators' EAL)
            out[f"{prefix}eal"] = expected_accepted_length([out[f"{prefix}step{i}_acc"] for i in range(k)])
        if "sim_count" in sums:
            out[f"{prefix}tau_sim"] = 1.0 + sums["sim_accepted"] / max(sums["sim_count"], 1.0)
        return out

    # ---- evaluation: simulated acceptance from the same unroll ------------------------------------
    @torch.no_grad()
    def eval_batch(self, model, inputs):
        """Loss metrics plus a simulated chain acceptance (as modules/training/eagle_trainer.simulated_acceptance):
        while the chain is alive, the draft's tokens equal the data tokens, so the unrolled TTT
        steps (which read data tokens) are exactly the draft's chain at decoding time. A parallel draft
        (P-EAGLE) reads mask inputs after step 0, so its unroll is exactly its one-forward block proposal."""
        draft = self.draft_module(model)
        s = self.slots(draft, inputs, noise=False)
        _, metrics = self.ttt_loss(model, s, self.kind.unroll_steps(draft, self.args.ttt_steps))
        steps, mask = self.kind.unroll_steps(draft, max(self.args.sim_steps, 1)), s["mask"]
        # the draft's greedy token of step k at every trained origin t (the chain's k-th token)
        k, b, t = mask.expand(steps, -1, -1).nonzero(as_tuple=True)
        _, logits = self.unroller(model)(s["ids"], s["feats"], s["am"], steps, (k, b, t))
        tok = logits.argmax(-1)
        if self.kind.own_vocab:
            tok = draft.to_target_ids(tok)
        tokens = torch.full((steps, *mask.shape), -1, dtype=torch.long, device=mask.device)
        tokens[k, b, t] = tok
        nxt = shift_left(s["ids"], 1, fill=-1)  # x_{t+2}: the data token slot t predicts
        nxt = torch.where(shift_left(s["am"], 1) > 0, nxt, torch.full_like(nxt, -1))
        greedy = (s["last"].to(self.target_head.dtype) @ self.target_head.T).argmax(-1)
        greedy = torch.where(nxt >= 0, greedy, torch.full_like(greedy, -2))
        alive = torch.ones_like(mask)
        accepted = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
        for i in range(steps):
            g, d = shift_left(greedy, i, -2), shift_left(nxt, i, -1)
            ok = alive & (tokens[i] == g)
            accepted += ok.long()
            alive = ok & (d == g)
        metrics.update(sim_accepted=(accepted * mask).sum(), sim_count=mask.sum())
        return metrics
