"""modules/cpu_linear.py: oneDNN pre-packed fp32 linear layers on CPU.

They must compute what nn.Linear computes (to fp32 rounding), keep the model's Parameters (tied
weights, state_dict), never serve a stale weight, fall back under autograd, and keep decoding
lossless: the packed target greedy-decodes the same tokens as torch's own kernels, and the tree
decoder on the packed target equals plain decoding on it.
"""
import copy

import pytest
import torch
from torch import nn

from modules.cpu_linear import PackedLinear, pack_linears, packing_available, unpack_linears
from tests._helpers_decode import plain_greedy

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize("rows", [1, 2, 16, 300])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_computes_what_linear_computes(rows, bias):
    torch.manual_seed(0)
    plain = nn.Linear(96, 160, bias=bias)
    packed = PackedLinear.from_linear(copy.deepcopy(plain))
    x = torch.randn(1, rows, 96)
    with torch.no_grad():
        expected, got = plain(x), packed(x)
    assert got.shape == expected.shape == (1, rows, 160)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert packed._packed is not None, "the oneDNN path was not taken"


def test_one_dimensional_and_empty_inputs_fall_back():
    torch.manual_seed(0)
    plain = nn.Linear(8, 4)
    packed = PackedLinear.from_linear(copy.deepcopy(plain))
    with torch.no_grad():
        for x in (torch.randn(8), torch.randn(0, 8), torch.randn(2, 0, 8)):
            assert torch.allclose(packed(x), plain(x), atol=1e-6) and packed(x).shape == plain(x).shape


def test_pack_linears_keeps_parameters_and_follows_in_place_changes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    keys, weights = list(model.state_dict()), [p for p in model.parameters()]
    x = torch.randn(3, 8)
    assert pack_linears(model) == 2
    assert list(model.state_dict()) == keys and [p for p in model.parameters()] == weights
    with torch.no_grad():
        before = model(x)
        model[0].weight.mul_(2.0)  # e.g. load_state_dict into a packed model
        after = model(x)
        model[0].weight.div_(2.0)
        assert torch.allclose(model(x), before, atol=1e-6)
    assert not torch.allclose(after, before, atol=1e-3), "a stale packed weight was used"
    assert unpack_linears(model) == 2 and type(model[0]) is nn.Linear


def test_autograd_falls_back_and_copies_work():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    pack_linears(model)
    x = torch.randn(2, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None
    with torch.no_grad():
        model(x.detach())  # builds the packed copy
    clone = copy.deepcopy(model)
    assert clone[0]._packed is None and clone[0].weight.data_ptr() != model[0].weight.data_ptr()
    with torch.no_grad():
        assert torch.allclose(clone(x), model(x), atol=1e-6)


def test_embedded_target_is_packed_tied_and_greedy_equal_to_torch_kernels(smollm2):
    """The loaded embedded target runs packed layers, its head stays tied to the embeddings, and its
    greedy tokens equal those of the same weights on torch's own kernels."""
    from modules.decode.tree_decoding import EagleDecoder
    from modules.draft.eagle_draft import EagleDraft

    target, tokenizer = smollm2
    head = target.get_output_embeddings()
    assert isinstance(head, PackedLinear)
    assert head.weight is target.get_input_embeddings().weight
    messages = [{"role": "user", "content": "Write a haiku about rivers."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = torch.tensor(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    packed_ref = plain_greedy(target, prompt, 24)
    unpacked = copy.deepcopy(target)
    assert unpack_linears(unpacked) > 0
    assert plain_greedy(unpacked, prompt, 24) == packed_ref
    torch.manual_seed(0)
    draft = EagleDraft.from_target(target).eval()
    res = EagleDecoder(target, draft, total_tokens=16, depth=4, top_k=4).generate(prompt, 24)
    assert res.tokens == packed_ref
