"""fp32 linear layers on CPU through oneDNN with pre-packed weights: cheap for a few rows.

Why: PyTorch's fp32 `F.linear` on CPU calls MKL, whose product for a few rows (2-16: a tree verify)
costs 2-3x its one-row path, and whose one-row path for a wide layer (the 49k-row LM head) is slow
too. oneDNN with the weight reordered once into its blocked layout runs 1-16 rows at nearly one
row's cost. Measured on a 2-core AMD EPYC (AVX-512) with SmolLM2-135M on a 300-token cache
(benchmark/bench_decode_cost.py, benchmark/results/decode_cost.json): a plain step 75.5 -> 54.6 ms,
a 12-token verify 143.6 -> 67.6 ms.

`pack_linears(model)` swaps every fp32 `nn.Linear` of a CPU model for a `PackedLinear` in place.
A PackedLinear IS an nn.Linear: same `weight`/`bias` Parameters (tied weights stay tied,
state_dict and exports are unchanged); the packed copy is a plain attribute, rebuilt if the weight
changes in place, so it never serves stale weights. It falls back to `F.linear` where oneDNN does
not apply (autograd, another dtype or device, 1-D or empty input). Costs one extra copy of the weights in memory.
Results equal F.linear's to fp32 rounding (summation order differs), and plain decoding and tree
verify run the same kernels, so greedy decoding stays lossless (tests/test_cpu_linear.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

# Row count oneDNN tunes the packed layout for: the size of a tree verify. Any row count works.
PACKED_BATCH_HINT = 16


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedLinear(nn.Linear):
    """An nn.Linear whose CPU fp32 forward without autograd runs oneDNN on a pre-packed weight."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PackedLinear":
        packed = cls.__new__(cls)
        packed.__dict__.update(linear.__dict__)  # same Parameters, hooks and flags: nothing copied
        packed._packed, packed._packed_version = None, None
        return packed

    def _packed_weight(self):
        version = (self.weight._version, self.weight.data_ptr())
        if self._packed is None or self._packed_version != version:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACKED_BATCH_HINT)
            self._packed_version = version
        return self._packed

    def forward(self, x):
        w = self.weight
        usable = (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype == torch.float32
                  and x.dim() >= 2 and x.numel() > 0
                  and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))
        if not usable:
            return F.linear(x, w, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._packed_weight(), bias, "none", [], "")

    def __getstate__(self):  # deepcopy / pickling: the packed copy is rebuilt on first use
        state = dict(self.__dict__)
        state["_packed"], state["_packed_version"] = None, None
        return state


def _replace_children(model: nn.Module, wanted, build) -> int:
    """Replace every submodule `wanted(child)` accepts by `build(child)`, in place; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if wanted(child):
                setattr(parent, name, build(child))
                count += 1
    return count


def pack_linears(model: nn.Module) -> int:
    """Swap the fp32 nn.Linear layers of a CPU model for PackedLinear, in place; returns how many.
    A no-op (0) for GPU models, other dtypes, or a torch build without oneDNN."""
    if not packing_available():
        return 0
    return _replace_children(
        model, lambda m: type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32,
        PackedLinear.from_linear)


def unpack_linears(model: nn.Module) -> int:
    """The inverse of pack_linears (plain nn.Linear again, same Parameters); returns how many."""
    def plain(packed):
        linear = nn.Linear.__new__(nn.Linear)
        linear.__dict__.update({k: v for k, v in packed.__dict__.items() if k not in ("_packed", "_packed_version")})
        return linear
    return _replace_children(model, lambda m: isinstance(m, PackedLinear), plain)
