"""Target features: what the EAGLE drafts learn from.

EAGLE-1/2 use the target's last hidden state AFTER the final norm (the vector lm_head turns into
logits). EAGLE-3 additionally fuses three intermediate hidden states ("aux layers"). Ids index
HF's `hidden_states` tuple: entry 0 is the embedding output, entry i the input of decoder layer i.
A target spread over GPUs (--spread-target) leaves each layer's output on its own GPU: features are
gathered onto the target's output device (modules/placement.py), where the draft lives.
"""
import torch

from modules.placement import output_device


def base_model(model):
    """The decoder stack without the LM head (LlamaModel inside LlamaForCausalLM, etc.)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.base_model


def gather_layers(hidden_states, layer_ids: list[int], device) -> torch.Tensor:
    """cat(hidden_states[i] for i in layer_ids) on `device`, whichever devices the layers ran on."""
    return torch.cat([hidden_states[i].to(device) for i in layer_ids], dim=-1)


@torch.no_grad()
def target_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    aux_layers: list[int] | None = None):
    """(last [B,T,H], aux [B,T,len(aux_layers)*H] or None) for a (right-)padded batch.

    `last` is the post-final-norm state: lm_head(last) equals the model's logits. The LM head
    itself is skipped: it is the most expensive matmul for small targets and not needed here.
    Both are returned on the target's output device (its LM head's device).
    """
    want_aux = bool(aux_layers)
    out = base_model(model)(input_ids=input_ids, attention_mask=attention_mask,
                            output_hidden_states=want_aux, use_cache=False, return_dict=True)
    return output_features(model, out, aux_layers)


def output_features(model, out, aux_layers: list[int] | None = None):
    """(last, aux or None) of a base-model output (run with output_hidden_states when aux_layers are
    wanted), on the target's output device: the one rule for every forward that makes features,
    full conversations (target_features) or KV-cached chunks while replies are generated (self_distill.py)."""
    device = output_device(model)
    aux = None
    if aux_layers:
        n = len(out.hidden_states)
        for i in aux_layers:
            if not 0 <= i < n - 1:  # the last entry is the normed output, not a layer input
                raise ValueError(f"aux layer id {i} out of range for a model with {n - 1} layers")
        aux = gather_layers(out.hidden_states, aux_layers, device)
    return out.last_hidden_state.to(device), aux
