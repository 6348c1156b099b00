"""Framework adapters: PyTorch tensors and NumPy arrays behind one small interface.

The kernels see raw pointers; this module turns the caller's objects into
pointers (after making them contiguous), tells their dtype and device by
name, and allocates outputs of the caller's framework on the caller's device.

PyTorch is optional. It is never imported here: a torch tensor can only reach
qmoe if the caller has imported torch already, so ``sys.modules`` tells.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# dtype names shared by both frameworks (torch's str(dtype) without "torch.",
# NumPy's dtype.name, including ml_dtypes' bfloat16 / float8 names).
F16 = "float16"
BF16 = "bfloat16"
E4M3 = "float8_e4m3fn"
E5M2 = "float8_e5m2"
U8 = "uint8"
F32 = "float32"


def _torch():
    return sys.modules.get("torch")


def compiling() -> bool:
    """True while torch.compile (dynamo) traces the caller: the package functions
    then call the torch.library ops of qmoe.ops instead of running."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.compiler.is_compiling()


def torch_ops():
    """The qmoe.ops module (registered ops), for calls traced by torch.compile."""
    ops = sys.modules.get("qmoe.ops")
    if ops is None:
        raise RuntimeError(
            "torch.compile is tracing a qmoe function before qmoe's torch ops were "
            "registered: `import qmoe.ops` first"
        )
    return ops


def _ml_dtypes(purpose: str):
    try:
        import ml_dtypes
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(
            f"qmoe: {purpose} with NumPy arrays needs the ml_dtypes package "
            "(pip install ml_dtypes), which gives NumPy its bfloat16 and float8 dtypes"
        ) from e
    return ml_dtypes


def type_name(x: Any) -> str:
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


class TorchFramework:
    name = "torch.Tensor"

    def __init__(self, torch):
        self.torch = torch

    def owns(self, x: Any) -> bool:
        return isinstance(x, self.torch.Tensor)

    def dtype_name(self, x) -> str:
        return str(x.dtype).removeprefix("torch.")

    def is_integer(self, x) -> bool:
        d = x.dtype
        return not d.is_floating_point and not d.is_complex and d != self.torch.bool

    def device(self, x):
        """(type, index) of the tensor's device; index 0 where torch has none."""
        d = x.device
        return d.type, (d.index if d.index is not None else 0)

    def device_str(self, x) -> str:
        return str(x.device)

    def same_device(self, x, y) -> bool:
        return x.device == y.device

    def contiguous(self, x):
        return x.contiguous()

    def ptr(self, x) -> int:
        return x.data_ptr() if x.numel() > 0 else 0

    def to_int32(self, x):
        return x.to(self.torch.int32).contiguous()

    def to_float32(self, x):
        return x.to(self.torch.float32).contiguous()

    def total(self, x) -> int:
        """Sum of an integer tensor (host sync on CUDA: CPU callers only)."""
        return int(x.sum().item())

    def min(self, x) -> int:
        return int(x.min().item())

    def dtype(self, name: str):
        return getattr(self.torch, name)

    def empty(self, shape, dtype_name: str, like):
        return self.torch.empty(tuple(shape), dtype=self.dtype(dtype_name), device=like.device)

    def zeros(self, shape, dtype_name: str, like):
        return self.torch.zeros(tuple(shape), dtype=self.dtype(dtype_name), device=like.device)

    def capturing(self, x) -> bool:
        """True while the current CUDA stream of x's device captures a CUDA graph."""
        return x.device.type == "cuda" and self.torch.cuda.is_current_stream_capturing()

    def stream(self, x) -> int:
        """The current CUDA stream of x's device, as an integer (0 on CPU)."""
        if x.device.type != "cuda":
            return 0
        return int(self.torch.cuda.current_stream(x.device).cuda_stream)

    def to_cpu(self, x):
        return x.cpu()

    def to_device_of(self, x, like):
        return x.to(like.device)


class NumpyFramework:
    name = "numpy.ndarray"

    def owns(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def dtype_name(self, x) -> str:
        return x.dtype.name

    def is_integer(self, x) -> bool:
        return np.issubdtype(x.dtype, np.integer)

    def device(self, x):
        return "cpu", 0

    def device_str(self, x) -> str:
        return "cpu"

    def same_device(self, x, y) -> bool:
        return True

    def contiguous(self, x):
        if not x.dtype.isnative:
            x = x.astype(x.dtype.newbyteorder("="))
        return np.require(x, requirements=("C", "A"))

    def ptr(self, x) -> int:
        return int(x.ctypes.data) if x.size > 0 else 0

    def to_int32(self, x):
        return np.ascontiguousarray(x, dtype=np.int32)

    def to_float32(self, x):
        return np.ascontiguousarray(x, dtype=np.float32)

    def total(self, x) -> int:
        return int(x.sum(dtype=np.int64)) if x.size else 0

    def min(self, x) -> int:
        return int(x.min())

    def dtype(self, name: str):
        if name in (BF16, E4M3, E5M2):
            return np.dtype(getattr(_ml_dtypes(f"dtype {name}"), name))
        return np.dtype(name)

    def empty(self, shape, dtype_name: str, like):
        return np.empty(tuple(shape), dtype=self.dtype(dtype_name))

    def zeros(self, shape, dtype_name: str, like):
        return np.zeros(tuple(shape), dtype=self.dtype(dtype_name))

    def capturing(self, x) -> bool:
        return False

    def stream(self, x) -> int:
        return 0

    def to_cpu(self, x):
        return x

    def to_device_of(self, x, like):
        return x


_NUMPY = NumpyFramework()
_TORCH: TorchFramework | None = None


def framework_of(x: Any, name: str):
    """The adapter for x, or TypeError naming the argument."""
    global _TORCH
    if isinstance(x, np.ndarray):
        return _NUMPY
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        if _TORCH is None or _TORCH.torch is not torch:
            _TORCH = TorchFramework(torch)
            # The first torch tensor registers the torch.library ops (qmoe.ops).
            import importlib

            importlib.import_module("qmoe.ops")
        return _TORCH
    raise TypeError(
        f"{name} must be a torch.Tensor or a numpy.ndarray, got {type_name(x)}"
    )


def expect_same_framework(fw, x: Any, name: str, ref_name: str = "activations"):
    """TypeError unless x is an object of framework fw."""
    if not fw.owns(x):
        raise TypeError(
            f"{name} must be a {fw.name} like {ref_name}, got {type_name(x)}"
        )
