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

Arguments may be PyTorch tensors (CPU or CUDA; CUDA work is queued on the
current stream of the tensors' device, without host synchronisation) or NumPy
arrays (CPU; bfloat16 and float8 through the ml_dtypes dtypes). Results come
back in the caller's framework, on the caller's device. PyTorch is optional.
"""

from . import _ext
from ._ext import UnsupportedError
from ._gemm import moe, moe_gemm, moe_gemm_decode, moe_gemm_prefill
from ._quant import dequantize, quantize

__version__: str = _ext.version()


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
    "UnsupportedError",
    "__version__",
    "built_with_cuda",
    "dequantize",
    "moe",
    "moe_gemm",
    "moe_gemm_decode",
    "moe_gemm_prefill",
    "num_threads",
    "quantize",
    "set_num_threads",
]
