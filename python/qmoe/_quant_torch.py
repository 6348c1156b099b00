"""The quantizer of include/qmoe/quantize.h in PyTorch operations, for CUDA tensors.

qmoe.quantize runs the C++ quantizer on the CPU; for a CUDA tensor that means a
copy to the host, float32 conversion there, and the results copied back, which
dominates the conversion of a whole model. This module computes the same codes,
scales and zeros on the tensor's own device, bit for bit (the tests compare it
with the C++ quantizer on CPU tensors): every step is an IEEE float32 operation
of the C++ code in the same order (the division by the stored scale, rounding
half to even, clamping, round-to-nearest-even casts to the activation dtype and
to the fp8 formats), and the packing of DESIGN.md section 2.
"""

from __future__ import annotations

import sys

from . import _ext

WT = _ext.WeightType
_QMAX = {WT.int8: 127.0, WT.int4: 7.0, WT.int2: 1.0}
_BITS = {WT.int8: 8, WT.int4: 4, WT.int2: 2}
_FP8 = {WT.fp8_e4m3: ("float8_e4m3fn", 448.0), WT.fp8_e5m2: ("float8_e5m2", 57344.0)}
_CHUNK_ELEMENTS = 1 << 27  # float32 working set of one chunk of experts (512 MiB)


def quantize(w, weight_type, asym: bool, act_name: str, group_size: int):
    """torch tensor [E, N, K] -> (qweights, scales or None, zeros or None) on w's device."""
    torch = sys.modules["torch"]
    act = getattr(torch, act_name)
    E, N, K = (int(s) for s in w.shape)
    if weight_type == WT.native16:
        return w.to(act).contiguous(), None, None
    G = K // group_size
    if weight_type in _FP8:
        q_dtype = getattr(torch, _FP8[weight_type][0])
        Kp = K
    else:
        q_dtype = torch.uint8
        Kp = K * _BITS[weight_type] // 8
    q = torch.empty((E, N, Kp), dtype=q_dtype, device=w.device)
    scales = torch.empty((E, N, G), dtype=act, device=w.device)
    zeros = torch.empty((E, N, G), dtype=act, device=w.device) if asym else None
    step = max(1, _CHUNK_ELEMENTS // max(N * K, 1))
    for e0 in range(0, E, step):
        e1 = min(E, e0 + step)
        x = w[e0:e1].to(torch.float32).reshape(e1 - e0, N, G, group_size)
        codes, s, z = _group_codes(torch, x, weight_type, asym, act)
        scales[e0:e1] = s.to(act)
        if asym:
            zeros[e0:e1] = z.to(act)
        if weight_type in _FP8:
            q[e0:e1] = codes.reshape(e1 - e0, N, K)
        else:
            q[e0:e1] = _pack(torch, codes.reshape(e1 - e0, N, K), _BITS[weight_type])
    return q, scales, zeros


def _stored(torch, v, act):
    """float32 -> the activation dtype (round to nearest even) -> float32."""
    return v.to(act).to(torch.float32)


def _group_codes(torch, x, weight_type, asym, act):
    """x [e, N, G, gs] float32 -> (codes [e, N, G, gs], scales [e, N, G] float32, zeros)."""
    lo = x.amin(dim=-1)
    hi = x.amax(dim=-1)
    if weight_type in _FP8:
        fmt, fmax = _FP8[weight_type]
        s = _stored(torch, torch.maximum(lo.abs(), hi.abs()) / fmax, act)
        sx = s.unsqueeze(-1)
        v = torch.where(sx > 0, x / sx, torch.zeros_like(x))
        # The C++ cast saturates; torch's does not: clamp first (same result, as
        # every value beyond the largest finite one rounds to it when saturating).
        v = v.clamp(-fmax, fmax)
        return v.to(getattr(torch, fmt)), s, None
    if asym:
        levels = float((1 << _BITS[weight_type]) - 1)
        lo = torch.clamp(lo, max=0.0)
        hi = torch.clamp(hi, min=0.0)
        s = torch.where(hi > lo, (hi - lo) / levels, torch.ones_like(lo))
        s = _stored(torch, s, act)
        pos = s > 0
        safe = torch.where(pos, s, torch.ones_like(s))
        z = torch.where(pos, torch.clamp(torch.round(-lo / safe), 0.0, levels), torch.zeros_like(s))
        sx, zx = safe.unsqueeze(-1), z.unsqueeze(-1)
        r = torch.where(pos.unsqueeze(-1), torch.round(x / sx) + zx, zx.expand_as(x))
        r = torch.round(r)
        r = torch.where(r >= 0.0, r, torch.zeros_like(r))  # also NaN -> 0, as the C++ code
        r = torch.clamp(r, max=levels)
        return r.to(torch.int32), s, z
    qmax = _QMAX[weight_type]
    qmin = -qmax - 1.0
    s = _stored(torch, torch.maximum(lo.abs(), hi.abs()) / qmax, act)
    pos = s > 0
    safe = torch.where(pos, s, torch.ones_like(s)).unsqueeze(-1)
    r = torch.where(pos.unsqueeze(-1), torch.round(x / safe), torch.zeros_like(x))
    r = torch.where(r >= qmin, r, torch.full_like(r, qmin))  # also NaN -> qmin
    r = torch.clamp(r, max=qmax)
    return r.to(torch.int32), s, None


def _pack(torch, codes, bits: int):
    """int32 codes [..., K] (two's complement or unsigned) -> uint8 [..., K * bits / 8]."""
    mask = (1 << bits) - 1
    c = (codes & mask).to(torch.uint8)
    if bits == 8:
        return c
    per = 8 // bits
    c = c.reshape(*c.shape[:-1], c.shape[-1] // per, per)
    out = c[..., 0].clone()
    for j in range(1, per):
        out |= c[..., j] << (bits * j)
    return out
