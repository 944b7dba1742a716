"""Target features: the stored `last` feature is what lm_head consumes; aux ids index layer inputs."""
import torch

from modules.data.features import target_features
from modules.export.engines import default_aux_layers


def test_default_aux_layers():
    assert default_aux_layers(30) == [2, 15, 27]
    assert default_aux_layers(32) == [2, 16, 29]


def test_last_feature_feeds_lm_head(smollm2):
    model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True,
                                  add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    last, aux = target_features(model, ids)
    assert aux is None and last.shape == (1, ids.shape[1], model.config.hidden_size)
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(model.lm_head(last), logits, rtol=1e-4, atol=1e-4)


def test_aux_features_are_layer_inputs(smollm2):
    model, _ = smollm2
    ids = torch.tensor([[1, 20, 30, 40, 2], [1, 50, 60, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    layers = default_aux_layers(model.config.num_hidden_layers)
    last, aux = target_features(model, ids, mask, aux_layers=layers)
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    H = model.config.hidden_size
    assert aux.shape == (2, 5, 3 * H)
    for j, i in enumerate(layers):
        torch.testing.assert_close(aux[..., j * H:(j + 1) * H], hs[i])
    # Right padding does not change the real positions of the shorter row.
    alone, _ = target_features(model, ids[1:, :4])
    torch.testing.assert_close(last[1, :4], alone[0], rtol=1e-4, atol=1e-4)
