"""qmoe: quantized Mixture-of-Experts grouped products (CPU and CUDA).

An independent implementation of the MoE API of AutoRound's ARK extension,
with the same names, arguments and tensor layouts (DESIGN.md §2)::

    out = qmoe.moe_gemm_decode(activations, weights, num_tokens_per_expert,
                               scales=scales, zeros=None, weight_bits=4,
                               group_size=128, asym=False)
    out = qmoe.moe_gemm_prefill(...)          # same arguments
    out = qmoe.moe(..., phase="auto", decode_threshold=4)
    out = qmoe.moe_gemm(activations, weights_EKN, num_tokens_per_expert, scales=None)

    qweights, scales, zeros = qmoe.quantize(w_ENK, weight_bits=4, group_size=128)
    w = qmoe.dequantize(qweights, scales, zeros, weight_bits=4, group_size=128)

Beyond ARK, a whole MoE layer in one call (routing, grouping, gate/up product,
SiLU·mul, down product, weighted sum, shared experts)::

    gate_up = qmoe.quantize_experts(w_gate_up, weight_bits=4)   # [E, 2I, H], gate rows first
    down = qmoe.quantize_experts(w_down, weight_bits=4)         # [E, H, I]
    out = qmoe.fused_moe(hidden_states, gate_up, down, router_logits=logits, top_k=2,
                         renormalize=True)
    ids, weights = qmoe.moe_route(logits, top_k=2)

``import qmoe.ops`` registers every op with torch.library (torch.ops.qmoe.*) for
torch.compile and CUDA graphs; ``qmoe.integrations.transformers.quantize_moe``
converts the MoE blocks of a transformers model.

Arguments may be PyTorch tensors (CPU or CUDA; CUDA work is queued on the
current stream of the tensors' device, without host synchronisation) or NumPy
arrays (CPU; bfloat16 and float8 through the ml_dtypes dtypes). Results come
back in the caller's framework, on the caller's device. PyTorch is optional.
"""

import sys

from . import _ext
from ._ext import UnsupportedError
from ._fused import (
    QuantizedExperts,
    clear_workspace_cache,
    fused_moe,
    fused_moe_workspace_size,
    moe_route,
    quantize_experts,
)
from ._gemm import moe, moe_gemm, moe_gemm_decode, moe_gemm_prefill
from ._quant import dequantize, quantize

__version__: str = _ext.version()

if sys.modules.get("torch") is not None:  # register the torch.library ops (torch.ops.qmoe.*)
    from . import ops  # noqa: F401


def set_num_threads(n: int) -> None:
    """Sets the size of the CPU kernels' thread pool; n < 1 restores the default
    (the QMOE_NUM_THREADS environment variable, else the hardware threads)."""
    _ext.set_num_threads(int(n))


def num_threads() -> int:
    """The number of threads the CPU kernels use."""
    return _ext.num_threads()


def built_with_cuda() -> bool:
    """True when this build of qmoe has its CUDA backend."""
    return _ext.built_with_cuda()


__all__ = [
    "QuantizedExperts",
    "UnsupportedError",
    "__version__",
    "built_with_cuda",
    "clear_workspace_cache",
    "dequantize",
    "fused_moe",
    "fused_moe_workspace_size",
    "moe",
    "moe_gemm",
    "moe_gemm_decode",
    "moe_gemm_prefill",
    "moe_route",
    "num_threads",
    "quantize",
    "quantize_experts",
    "set_num_threads",
]
