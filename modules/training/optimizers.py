"""`--optimizer muon`: Muon on the draft's 2-D hidden weights, AdamW on the rest (speculators' default).

Muon (torch.optim.Muon) orthogonalises each 2-D weight's momentum update (Newton-Schulz iterations); with
`adjust_lr_fn="match_rms_adamw"` its updates have AdamW's RMS, so one learning rate and one schedule serve both
halves. It takes the matrices inside the draft's layers and its fc; AdamW takes everything else that trains
(norms, biases, the draft's own lm_head, whose rows are output embeddings: Muon's authors keep those on AdamW).

`MuonWithAdamW` is one torch Optimizer over both, so the HF Trainer, accelerate, the learning-rate scheduler
(it walks `param_groups`, which are the two inner optimizers' own groups) and checkpoints see a single optimizer.
"""
import torch

OPTIMIZERS = ("adamw", "muon")
ADAMW_ONLY = ("lm_head", "embed_tokens")  # 2-D, but embeddings / output rows: AdamW


def muon_parameters(model) -> tuple[list, list]:
    """(2-D hidden weights for Muon, everything else that trains for AdamW), by name."""
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (muon if p.ndim == 2 and not any(part in name for part in ADAMW_ONLY) else adamw).append(p)
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon over `muon_params`, AdamW over `adamw_params`, stepped together."""

    def __init__(self, muon_params, adamw_params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95),
                 eps: float = 1e-8):
        self.inner = []
        if muon_params:
            self.inner.append(torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay,
                                               adjust_lr_fn="match_rms_adamw"))
        if adamw_params:
            self.inner.append(torch.optim.AdamW(adamw_params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if not self.inner:
            raise ValueError("no trainable parameters")
        super().__init__([p for opt in self.inner for g in opt.param_groups for p in g["params"]], {"lr": lr})
        # the scheduler and the Trainer read and write these: the inner optimizers' own group dicts
        self.param_groups = [g for opt in self.inner for g in opt.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for opt in self.inner:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"inner": [opt.state_dict() for opt in self.inner]}

    def load_state_dict(self, state_dict):
        saved = state_dict["inner"]
        if len(saved) != len(self.inner):
            raise ValueError(f"optimizer state holds {len(saved)} optimizers, this run has {len(self.inner)}")
        for opt, sd in zip(self.inner, saved):
            opt.load_state_dict(sd)
        self.param_groups = [g for opt in self.inner for g in opt.param_groups]


def build_muon(model, args) -> MuonWithAdamW:
    """The optimizer of a TrainingArguments with optimizer == "muon"."""
    muon, adamw = muon_parameters(model)
    return MuonWithAdamW(muon, adamw, lr=args.learning_rate, weight_decay=args.weight_decay,
                         betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
