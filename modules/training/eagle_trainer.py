"""EagleTrainer: an HF Trainer that trains an EAGLE-1/2 draft on stored target features.

Loss (per trained token, averaged over trained tokens):
    w_reg * SmoothL1(pred_feature, target_feature)
  + w_cls * soft cross-entropy  -sum softmax(head(target)) * log_softmax(head(pred))
The target side is detached (the head is frozen anyway). The prediction side is NOT: the CE
term's gradient flows into the draft. NickL77/BaldEagle detaches it too (`detach_cls_pred=True`
reproduces that recipe; the CE term then only shows up in the logs).

Extension points for subclasses (the EAGLE-3 TTT trainer):
  eagle_loss(model, inputs) -> (loss, metrics)   metrics are SUMS (see METRIC_KEYS) so they can be
                                                 added over micro-batches and ranks before dividing
  eval_batch(model, inputs) -> metrics           loss metrics + simulated acceptance sums
  summarize(sums, prefix) -> {name: value}       sums -> logged averages
  save_draft(model, output_dir)                  what a checkpoint holds (model.save_pretrained without the
                                                 frozen embedding: it is the target's, reloaded from it)
  load_draft_weights(model, checkpoint_dir)      resume
Frozen weights (the target's embedding / lm_head inside the draft) are kept in the training dtype
(bf16 under bf16 autocast, where an fp32 copy would only cost memory) and never saved in checkpoints.
Shared helpers: soft_cross_entropy, topk_hits, add_uniform_noise, simulated_acceptance.
"""
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainingArguments
from transformers.cache_utils import DynamicCache

from modules.training.settings import LossSettings


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: training stops before the optimizer step, checkpoints stay good."""


@dataclass
class EagleTrainingArguments(TrainingArguments, LossSettings):
    """HF TrainingArguments + what EagleTrainer reads: the loss weights and the schedule (LossSettings,
    declared once in modules/training/settings.py: the scripts' flags fill them; w_reg / w_cls / noise_std
    left at None are the draft kind's, filled in by EagleTrainer) and detach_cls_pred."""
    detach_cls_pred: bool = field(default=False, metadata={"help": "BaldEagle recipe: no CE gradient"})

    @property
    def n_gpu(self) -> int:
        """One device per process (modules/placement.py): a plain process trains on cuda:0 alone, never
        nn.DataParallel over every visible GPU; several GPUs train under torchrun (DDP, one process each)."""
        return min(super().n_gpu, 1)


# ----------------------------------------------------------------------------- helpers

def soft_cross_entropy(pred_logits, target_logits):
    """Per-row -sum p_target * log p_pred (float32 for a stable log_softmax)."""
    p = torch.softmax(target_logits.float(), dim=-1)
    return -(p * torch.log_softmax(pred_logits.float(), dim=-1)).sum(-1)


def topk_hits(pred_logits, target_ids, ks=(1, 2, 3)):
    """{k: number of rows whose target id is in the draft's top-k}."""
    top = pred_logits.topk(max(ks), dim=-1).indices
    hit = top == target_ids.unsqueeze(-1)
    return {k: hit[:, :k].any(-1).sum() for k in ks}


# The most [rows, vocab] logit elements the EAGLE-1/2 loss computes at once (fp32: 512 MB a tensor). Above it
# (Llama-3's 128k vocabulary x 4k trained tokens: 2 GB a tensor, several of them kept for the backward pass) the
# rows go in chunks whose logits are recomputed in the backward pass (activation checkpointing) instead of kept:
# one more head matmul per chunk, memory bounded by the chunk. Below it (the embedded SmolLM2 with a few
# conversations) nothing changes.
LOGIT_CHUNK_ELEMENTS = 1 << 27


def head_loss(draft, pred, target, ks=(1, 2, 3), max_elements=LOGIT_CHUNK_ELEMENTS):
    """(soft cross-entropy per row [N], {k: rows whose target argmax is in the draft's top-k}) of the draft's
    head on predicted features `pred` [N, H] against the target features `target` [N, H] (no gradient)."""
    def part(p, t):
        with torch.no_grad():
            target_logits = draft.compute_logits(t)
        pred_logits = draft.compute_logits(p)
        ce = soft_cross_entropy(pred_logits, target_logits)
        with torch.no_grad():
            hits = topk_hits(pred_logits, target_logits.argmax(-1), ks)
        return (ce, *(hits[k] for k in ks))

    rows = max(1, max_elements // draft.lm_head.weight.shape[0])
    if pred.shape[0] <= rows:
        out = [part(pred, target)]
    else:
        from torch.utils.checkpoint import checkpoint
        out = [checkpoint(part, p, t, use_reentrant=False) for p, t in zip(pred.split(rows), target.split(rows))]
    ce = torch.cat([o[0] for o in out])
    return ce, {k: sum(o[1 + i] for o in out) for i, k in enumerate(ks)}


def add_uniform_noise(hidden_states, attention_mask, std):
    """EAGLE's uniform noise: (U(0,1) - 0.5) * std * 512 / seq_len, seq_len per row."""
    lengths = attention_mask.sum(1).clamp(min=1).to(hidden_states.dtype)
    scale = (std * 512.0 / lengths).view(-1, 1, 1)
    return hidden_states + (torch.rand_like(hidden_states) - 0.5) * scale


def _chain_mask(T, step, device, batch):
    """Bool mask [B,1,T,T*(step+1)]: row t sees real slots 0..t and its own chain slots 1..step."""
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * step, dim=1)[None, None].expand(batch, 1, T, T * (step + 1))


# Attention implementations that take a 2D padding mask only: a 4D mask means something else to them.
PADDING_MASK_ONLY = ("flash_attention_2", "flash_attention_3")


@contextmanager
def attention_for_4d_masks(draft):
    """Run `draft` through SDPA inside the block when its attention implementation reads only
    padding masks (flash attention would take the chain mask of simulated_acceptance for a
    padding mask). Same weights, same function; the configured implementation comes back after."""
    config = getattr(draft, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in PADDING_MASK_ONLY:
        yield
        return
    config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = impl


@torch.no_grad()
def simulated_acceptance(draft, batch, steps):
    """Run the draft autoregressively `steps` times from every slot, as at decoding time, and
    count how many of its greedy tokens the target would accept.

    Step 0 at slot t uses the stored inputs (x_{t+1}, f_t); step s feeds the draft its own
    previous token and feature at slot t+s, attending to the real slots 0..t and its own chain
    (the KV cache of EAGLE decoding). Step s is accepted when the whole chain so far matched the
    target's greedy token (argmax head(stored f)). Past a slot where the data token differs from
    the target's greedy token the stored features are off the target's own path, so the chain
    is cut there: on data the target did not write itself this is a lower bound.
    Returns (sum of accepted lengths over origins with loss_mask, number of origins);
    tau_sim = 1 + sum / count (the bonus token counts, as in real decoding).
    The chain steps need a 4D mask: flash-attention drafts run through SDPA here.
    """
    with attention_for_4d_masks(draft):
        return _simulated_acceptance(draft, batch, steps)


def _simulated_acceptance(draft, batch, steps):
    dtype = draft.fc.weight.dtype
    ids, hs, mask = batch["input_ids"], batch["hidden_states"].to(dtype), batch["loss_mask"].bool()
    nxt = batch["next_ids"]
    B, T, _ = hs.shape
    greedy = draft.compute_logits(batch["target"].to(dtype)).argmax(-1)
    greedy = torch.where(nxt >= 0, greedy, torch.full_like(greedy, -2))

    def shifted(x, s, fill):  # value at slot t+s for origin t
        return torch.cat([x[:, s:], torch.full_like(x[:, :s], fill)], dim=1)

    def greedy_tokens(out, rows):
        # the lm_head is the cost: run it only on chains still alive (dead rows never matter again:
        # each row attends only to real slots and to its own chain)
        tok = torch.zeros(B, T, dtype=torch.long, device=hs.device)
        if rows.any():
            tok[rows] = draft.compute_logits(out[rows]).argmax(-1)
        return tok

    cache = DynamicCache()
    out = draft(ids, hs, past_key_values=cache)
    alive = mask.clone()  # chains start from the trained positions only
    tok = greedy_tokens(out, alive)
    accepted = torch.zeros(B, T, dtype=torch.long, device=hs.device)
    pos = torch.arange(T, device=hs.device).unsqueeze(0).expand(B, T)
    for s in range(steps):
        if s > 0:
            out = draft(tok, out, attention_mask=_chain_mask(T, s, hs.device, B),
                        position_ids=pos + s, past_key_values=cache)
            tok = greedy_tokens(out, alive)
        g, d = shifted(greedy, s, -2), shifted(nxt, s, -1)
        ok = alive & (tok == g)
        accepted += ok.long()
        alive = ok & (d == g)
    return (accepted * mask).sum(), mask.sum()


def add_sums(sums, metrics):
    """sums[k] += metrics[k], on the device (no host sync): metrics are tensors or numbers."""
    for k, v in metrics.items():
        v = v.detach().float() if torch.is_tensor(v) else float(v)
        sums[k] = sums[k] + v if k in sums else v


# ----------------------------------------------------------------------------- trainer

METRIC_KEYS = ("reg_sum", "cls_sum", "top1", "top2", "top3", "n_trained", "n_tokens")


class EagleTrainer(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # our items carry loss_mask / target / next_ids that the model's forward does not name
        self.args.remove_unused_columns = False
        # HF's NaN filter reads every micro-step's loss on the host (a device sync each time);
        # a non-finite loss stops training here instead (_track_nonfinite / _raise_if_nonfinite)
        self.args.logging_nan_inf_filter = False
        self._fill_kind_loss_weights()
        self._sums = {}  # metric sums since the last log, as device tensors
        self._first_nonfinite = None  # device tensor [step, loss] of the first non-finite loss
        self._last_log_time = None
        self._frozen_to_training_dtype()
        if self.args.profile_steps > 0:  # --profile-steps: OUTPUT_DIR/profile.txt (modules/training/profiling.py)
            from modules.training.profiling import ProfileCallback

            self.add_callback(ProfileCallback(self.args.profile_steps, self.args.output_dir, self.args.device.type))

    # ---- loss -------------------------------------------------------------------------
    def _fill_kind_loss_weights(self):
        """w_reg / w_cls / noise_std left at None: the draft kind's (modules/draft/kinds.py decides them)."""
        unset = [name for name in ("w_reg", "w_cls", "noise_std") if getattr(self.args, name) is None]
        if unset:
            from modules.draft.kinds import kind_of

            weights = kind_of(self.draft_module()).loss_weights
            for name in unset:
                setattr(self.args, name, weights[name])

    def draft_module(self, model=None):
        return self.accelerator.unwrap_model(model if model is not None else self.model)

    def eagle_loss(self, model, inputs):
        """-> (loss, metric sums). Losses are averaged over trained tokens of this micro-batch."""
        args = self.args
        draft = self.draft_module(model)
        dtype = draft.fc.weight.dtype
        hs = inputs["hidden_states"].to(dtype)
        target = inputs["target"].to(dtype)
        if model.training and args.noise_std > 0:
            hs = add_uniform_noise(hs, inputs["attention_mask"], args.noise_std)
        # right padding + causal attention: no padding mask needed (pads come after real tokens)
        pred = model(input_ids=inputs["input_ids"], hidden_states=hs)
        sel = inputs["loss_mask"].bool()
        n = sel.sum()
        idx = sel.nonzero(as_tuple=True)  # the one host sync of a micro-step: the number of trained tokens
        pred_sel, target_sel = pred[idx], target[idx]  # head only where it is trained: [N, H] not [B*T, H]
        reg = F.smooth_l1_loss(pred_sel.float(), target_sel.float(), reduction="none").mean(-1)
        cls, hits = head_loss(draft, pred_sel.detach() if args.detach_cls_pred else pred_sel, target_sel)
        denom = n.clamp(min=1)
        loss = (args.w_reg * reg.sum() + args.w_cls * cls.sum()) / denom
        metrics = {"reg_sum": reg.sum().detach(), "cls_sum": cls.sum().detach(), "top1": hits[1],
                   "top2": hits[2], "top3": hits[3], "n_trained": n, "n_tokens": inputs["attention_mask"].sum()}
        return loss, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self.accelerator.autocast():
            loss, metrics = self.eagle_loss(model, inputs)
        if model.training:
            self._track_nonfinite(loss)
            add_sums(self._sums, metrics)
        return (loss, metrics) if return_outputs else loss

    # ---- non-finite losses: noted on the device every micro-step, checked before logs and saves ----
    def _track_nonfinite(self, loss):
        loss = loss.detach().float().reshape(())
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.full((2,), math.inf, device=loss.device)
        here = torch.stack([torch.full((), float(self.state.global_step), device=loss.device), loss])
        first = ~torch.isfinite(loss) & torch.isinf(self._first_nonfinite[0])
        self._first_nonfinite = torch.where(first, here, self._first_nonfinite)

    def _raise_if_nonfinite(self):
        """Stop (on every rank together) when a loss since the start was NaN/inf. Called before each
        training log, each checkpoint and at the end: a checkpoint never holds weights that such a
        step updated."""
        if self._first_nonfinite is None:
            return
        first = self._first_nonfinite[None]
        if self.args.world_size > 1:
            first = self.accelerator.gather(first)  # [ranks, 2]
        step, value = first[first[:, 0].argmin()].tolist()
        if math.isfinite(step):
            raise NonFiniteLossError(
                f"loss is {value} at step {int(step)}: stopped at step {self.state.global_step}, before "
                f"saving; checkpoints in {self.args.output_dir} are from before step {int(step)}")

    def _save_checkpoint(self, model, trial):
        self._raise_if_nonfinite()
        return super()._save_checkpoint(model, trial)

    # ---- logging ------------------------------------------------------------------------
    @staticmethod
    def summarize(sums, prefix=""):
        n = max(sums.get("n_trained", 0.0), 1.0)
        out = {f"{prefix}reg_loss": sums.get("reg_sum", 0.0) / n, f"{prefix}cls_loss": sums.get("cls_sum", 0.0) / n}
        for k in (1, 2, 3):
            out[f"{prefix}top{k}_acc"] = sums.get(f"top{k}", 0.0) / n
        if "sim_count" in sums:
            out[f"{prefix}tau_sim"] = 1.0 + sums["sim_accepted"] / max(sums["sim_count"], 1.0)
        return out

    def _reduce_sums(self, sums):
        """Device sums -> floats summed over ranks: one all-reduce and one host sync."""
        keys = sorted(sums)
        if not keys:
            return {}
        vec = torch.stack([torch.as_tensor(sums[k], device=self.args.device).float() for k in keys])
        if self.args.world_size > 1:
            vec = self.accelerator.reduce(vec, reduction="sum")
        return dict(zip(keys, vec.tolist()))

    def log(self, logs, start_time=None):
        if "loss" in logs:
            self._raise_if_nonfinite()
        if "loss" in logs and self._sums:  # a training log: add the metrics since the last one
            sums = self._reduce_sums(self._sums)
            now = time.time()
            since = self._last_log_time or getattr(self, "_train_start_time", now)
            logs.update({k: round(v, 5) for k, v in self.summarize(sums).items()})
            logs["tokens_per_s"] = round(sums["n_tokens"] / max(now - since, 1e-6), 1)
            self._last_log_time = now
            self._sums = {}
        super().log(logs, start_time) if start_time is not None else super().log(logs)

    def train(self, *args, **kwargs):
        self._train_start_time = time.time()
        self._last_log_time = None
        result = super().train(*args, **kwargs)
        self._raise_if_nonfinite()  # a last step after the last log
        return result

    # ---- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def eval_batch(self, model, inputs):
        loss, metrics = self.eagle_loss(model, inputs)
        acc, count = simulated_acceptance(self.draft_module(model), inputs, self.args.sim_steps)
        metrics.update(sim_accepted=acc, sim_count=count)
        return metrics

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.draft_module()
        was_training = model.training
        model.eval()
        sums = {}
        start = time.time()
        with self.accelerator.autocast(), self.unsharded():
            for inputs in dataloader:
                inputs = self._prepare_inputs(inputs)
                add_sums(sums, self.eval_batch(model, inputs))
        model.train(was_training)
        sums = self._reduce_sums(sums)
        metrics = self.summarize(sums, prefix=f"{metric_key_prefix}_")
        metrics[f"{metric_key_prefix}_runtime"] = round(time.time() - start, 2)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # ---- optimizer and schedule ------------------------------------------------------------
    def create_optimizer(self, model=None):
        """AdamW (the HF Trainer's), or with --optimizer muon Muon on the 2-D hidden weights and AdamW on the rest
        (modules/training/optimizers.py)."""
        if self.args.optimizer == "adamw":
            return super().create_optimizer(model)
        if self.args.optimizer != "muon":
            raise ValueError(f"optimizer must be one of adamw, muon, got {self.args.optimizer!r}")
        if self.is_fsdp_enabled:
            raise ValueError("--optimizer muon orthogonalises whole matrices: it does not run on FSDP shards "
                             "(use DDP, or --optimizer adamw)")
        if self.optimizer is None:
            from modules.training.optimizers import build_muon

            self.optimizer = build_muon(model if model is not None else self.model, self.args)
        return self.optimizer

    def create_scheduler(self, num_training_steps, optimizer=None):
        """Linear warmup, then a linear (or cosine) decay to lr * min_lr_ratio at the last step."""
        if self.lr_scheduler is None:
            warmup = self.args.get_warmup_steps(num_training_steps)
            floor, schedule = self.args.min_lr_ratio, self.args.lr_schedule
            if schedule not in ("linear", "cosine"):
                raise ValueError(f"lr_schedule must be 'linear' or 'cosine', got {schedule!r}")

            def factor(step):
                if step < warmup:
                    return (step + 1) / (warmup + 1)
                frac = min(1.0, (step - warmup) / max(1, num_training_steps - warmup))
                decay = 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
                return floor + (1.0 - floor) * decay

            self.lr_scheduler = LambdaLR(optimizer if optimizer is not None else self.optimizer, factor)
        return self.lr_scheduler

    # ---- checkpoints --------------------------------------------------------------------
    def _frozen_to_training_dtype(self):
        """Frozen draft weights in the dtype the forward computes in: under bf16 (fp16) autocast the
        embedding and lm_head run in bf16 anyway, and an fp32 copy of a [128k, 4096] matrix is 2 GB.
        Trained weights stay fp32 (the optimizer's master copy)."""
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        if dtype is None:
            return
        for p in self.draft_module().parameters():  # tied weights (embed = lm_head) come once
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)

    def save_draft(self, model, output_dir):
        """Trained weights + config; the frozen embedding is the target's (reloaded on resume and at
        export), so it stays out of every checkpoint."""
        model.save_pretrained(output_dir, with_embed=False)

    def checkpoint_weights(self, model, checkpoint_dir):
        """The trained weights a checkpoint holds, checked against `model`'s keys; the frozen ones are not
        in it (they stay as loaded from the target)."""
        path = os.path.join(checkpoint_dir, "model.safetensors")
        sd = load_file(path)
        sd.pop("embed_tokens.weight", None)  # frozen, from the target (older checkpoints hold it)
        expected = set(model.state_dict())
        frozen = ("embed_tokens.", "lm_head.", "rotary_emb.")
        missing = sorted(k for k in expected - set(sd) if not k.startswith(frozen))
        unexpected = sorted(set(sd) - expected)
        if missing or unexpected:
            raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
        return sd

    def load_draft_weights(self, model, checkpoint_dir):
        """Resume: the trained weights of a checkpoint into `model`."""
        model.load_state_dict(self.checkpoint_weights(model, checkpoint_dir), strict=False)

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        # under FSDP the Trainer hands rank 0 the consolidated weights (gathered on every rank)
        draft = self.plain_draft(state_dict) if self.is_fsdp_enabled and state_dict else self.draft_module()
        self.save_draft(draft, output_dir)
        # JSON, not the pickled training_args.bin of the stock Trainer
        with open(os.path.join(output_dir, "training_args.json.tmp"), "w") as f:
            f.write(self.args.to_json_string())
        os.replace(os.path.join(output_dir, "training_args.json.tmp"), os.path.join(output_dir, "training_args.json"))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_fsdp_enabled:  # called after sharding: every rank reads the whole weights into its shards
            self._load_full_state_dict(self.checkpoint_weights(self.draft_module(), resume_from_checkpoint))
            return
        self.load_draft_weights(self.draft_module(model), resume_from_checkpoint)

    # ---- FSDP (--fsdp): the draft's weights are sharded over the ranks -----------------------------
    # Training, the optimizer and the gradient reduction are the HF Trainer's (accelerate's FSDP2 plugin);
    # what reads whole weights outside the wrapped forward (saving, exporting, evaluation) comes here.
    def _draft_prefix(self):
        """The draft's name inside the trainer's model ('' or 'draft.' for TTTUnroll), for state-dict keys."""
        draft = self.draft_module()
        name = next(n for n, m in self.model.named_modules() if m is draft)
        return name + "." if name else ""

    def _full_state_dict(self):
        """The whole weights of the trainer's model on the CPU of every rank (a collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _load_full_state_dict(self, draft_state_dict):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        prefix = self._draft_prefix()
        set_model_state_dict(self.model, {prefix + k: v for k, v in draft_state_dict.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))

    def plain_draft(self, state_dict):
        """An unsharded CPU copy of the draft holding `state_dict` (the trainer model's whole weights):
        what checkpoints and exports are written from under FSDP, in the same layout as without it."""
        draft = self.draft_module()
        prefix = self._draft_prefix()
        plain = type(draft)(draft.config)
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        missing, unexpected = plain.load_state_dict(sd, strict=False)
        if unexpected or any(not k.startswith("rotary_emb.") for k in missing):
            raise ValueError(f"consolidated FSDP weights do not fit {type(draft).__name__}: missing {missing}, "
                             f"unexpected {unexpected}")
        return plain

    def full_draft(self):
        """The trained draft, whole: the draft itself, or under FSDP a plain copy on rank 0 (None on the
        other ranks). Every rank must call it (the gathering is a collective)."""
        if not self.is_fsdp_enabled:
            return self.draft_module()
        sd = self._full_state_dict()
        return self.plain_draft(sd) if self.args.should_save else None

    @contextmanager
    def unsharded(self):
        """Whole weights inside the block (evaluation calls the draft outside the wrapped forward)."""
        if not self.is_fsdp_enabled:
            yield
            return
        self.model.unshard()
        try:
            yield
        finally:
            self.model.reshard()
