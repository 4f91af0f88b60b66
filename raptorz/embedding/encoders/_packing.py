"""Linear layers whose weights oneDNN lays out once, for a frozen encoder on the CPU.

An ``nn.Linear`` on the CPU hands its weight to the BLAS at every call, which packs it
into the layout its kernels read. A frozen encoder's weights never change, so
:func:`pack_linears` does that once: each ``nn.Linear`` becomes a :class:`PackedLinear`
that holds oneDNN's prepacked weight (what ``torch.compile`` does for frozen CPU models,
without the compilation). ``benchmarks/bench_kernel.py`` prints the packed/unpacked
ratio; benchmarks/README.md holds what was measured.

The results are those of ``nn.Linear`` up to summation order (fp32: about 1e-6 relative;
bf16 under autocast: the same bf16 matmul). The packed weight replaces the original, so
memory does not double; the model's ``state_dict`` then lacks those weights, and
:class:`~raptorz.embedding.encoders.Encoder` takes its checksum before packing.
"""

from __future__ import annotations

import functools
import platform

import torch

from raptorz.embedding.encoders._encoder import PRECISION_DTYPES

#: dtype of the packed weights, per precision; fp16 stays unpacked (few CPUs run it)
PACKED_DTYPES = {p: PRECISION_DTYPES[p] for p in ("fp32", "bf16")}


def can_pack(device: torch.device, precision: str) -> bool:
    """Whether :func:`pack_linears` packs at ``precision`` on ``device``: an x86 CPU (where
    it was measured), a torch whose oneDNN packs and runs a small layer correctly, and for
    bf16 a CPU that oneDNN runs bf16 on natively."""
    if device.type != "cpu" or precision not in PACKED_DTYPES:
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return _packs(precision)


@functools.cache
def _packs(precision: str) -> bool:
    """One small layer packed and run: the ops exist, and agree with ``nn.Linear``."""
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return False
    if precision == "bf16" and not ops._is_mkldnn_bf16_supported():
        return False
    dtype = PACKED_DTYPES[precision]
    with torch.random.fork_rng(devices=[]):  # the caller's random stream is left alone
        torch.manual_seed(0)
        layer = torch.nn.Linear(8, 4).eval().requires_grad_(False)
        x = torch.randn(3, 8)
    try:
        got = PackedLinear(layer, dtype, rows=3)(x).float()
    except RuntimeError:  # an op this build of torch lacks for this CPU
        return False
    want = torch.nn.functional.linear(x.to(dtype), layer.weight.to(dtype),
                                      layer.bias.to(dtype)).float()
    return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2))


class PackedLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` with its weight prepacked for oneDNN, for inference only.

    Parameters
    ----------
    linear
        The layer to pack; its weight and bias are copied in ``dtype``.
    dtype
        ``torch.float32``, or ``torch.bfloat16`` for a model run under bf16 autocast:
        inputs are cast to it and outputs come in it, as autocast's linear does.
    rows
        The number of rows (tokens in a batch) oneDNN picks its layout for; any number of
        rows works.
    """

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype, rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = dtype
        weight = linear.weight.detach().to(dtype).contiguous()
        # plain attributes, not buffers: neither the state dict nor .to() may touch them
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias,
                                                  "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.dtype}")


def pack_linears(model: torch.nn.Module, precision: str, rows: int) -> int:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`PackedLinear`.

    Parameters
    ----------
    model
        A frozen model on the CPU, run at ``precision`` (fp32, or bf16 under autocast).
    precision
        ``fp32`` or ``bf16``.
    rows
        The rows a call usually has (batch size x tokens per image).

    Returns
    -------
    int
        The number of layers packed. Subclasses of ``nn.Linear`` are left alone: their
        forward may do more than a matmul.
    """
    dtype = PACKED_DTYPES[precision]
    packed = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Linear:
                setattr(module, name, PackedLinear(child, dtype, rows))
                packed += 1
    return packed
