"""Batching EAGLE-1/2 training items: shift by one, pad on the right.

A stored conversation has tokens x_0..x_{T-1}, the target's features f_0..f_{T-1} (f_t is what
the target's lm_head turns into the distribution of x_{t+1}) and loss_mask (1 = a token the
draft is trained to predict). Draft slot t (t = 0..T-2) sees token x_{t+1} and feature f_t and
must predict f_{t+1}; the logits of that prediction are the draft's guess for x_{t+2}. So

    input_ids[t]      = x_{t+1}
    hidden_states[t]  = f_t
    target[t]         = f_{t+1}
    loss_mask[t]      = loss_mask[t+2]   (0 for the last slot: x_T does not exist)
    next_ids[t]       = x_{t+2}          (-1 for the last slot; for the simulated acceptance length)

Batches are right-padded, so causal attention alone keeps pads out of every real position.
"""
import torch


class EagleCollator:
    def __init__(self, max_length=2048, pad_token_id=0):
        self.max_length = max_length
        self.pad_token_id = pad_token_id

    def shift(self, item):
        ids = item["input_ids"][: self.max_length + 1].long()
        hs = item["hidden_states"][: self.max_length + 1]
        lm = item["loss_mask"][: self.max_length + 1].long()
        T = len(ids) - 1
        mask = torch.zeros(T, dtype=torch.long)
        mask[: T - 1] = lm[2:]
        next_ids = torch.full((T,), -1, dtype=torch.long)
        next_ids[: T - 1] = ids[2:]
        return {"input_ids": ids[1:], "hidden_states": hs[:-1], "target": hs[1:],
                "loss_mask": mask, "next_ids": next_ids}

    def __call__(self, items):
        shifted = [self.shift(it) for it in items if len(it["input_ids"]) >= 3]
        if not shifted:
            raise ValueError("batch has no conversation of at least 3 tokens")
        T = max(len(s["input_ids"]) for s in shifted)
        H = shifted[0]["hidden_states"].shape[-1]
        B = len(shifted)
        dtype = shifted[0]["hidden_states"].dtype
        batch = {
            "input_ids": torch.full((B, T), self.pad_token_id, dtype=torch.long),
            "hidden_states": torch.zeros(B, T, H, dtype=dtype),
            "target": torch.zeros(B, T, H, dtype=dtype),
            "loss_mask": torch.zeros(B, T, dtype=torch.long),
            "next_ids": torch.full((B, T), -1, dtype=torch.long),
            "attention_mask": torch.zeros(B, T, dtype=torch.long),
        }
        for b, s in enumerate(shifted):
            n = len(s["input_ids"])
            for k in ("input_ids", "hidden_states", "target", "loss_mask", "next_ids"):
                batch[k][b, :n] = s[k]
            batch["attention_mask"][b, :n] = 1
        return batch
