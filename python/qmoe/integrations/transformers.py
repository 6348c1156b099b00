"""Run the MoE blocks of a Hugging Face transformers (5.x) model with qmoe.

    import qmoe.integrations.transformers as qt
    model = AutoModelForCausalLM.from_pretrained(..., dtype=torch.bfloat16)
    qt.quantize_moe(model, weight_bits=4, group_size=128)      # or fp8="e4m3"
    model.generate(...)

``quantize_moe`` finds the sparse MoE blocks of the model, quantizes their
routed experts into a qmoe encoding (gate and up as one [E, 2I, H] tensor, gate
rows first; down as [E, H, I]) and replaces each block by a
``QMoeSparseMoeBlock`` whose forward is one ``qmoe.fused_moe`` call: the model's
own router weight gives the logits, and qmoe routes them with the model's rule;
the shared experts run in the same call.

transformers 5 stores the routed experts of these models as fused 3-D
parameters (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I])
and their router as a module ``gate`` with a ``weight`` [E, H]. Supported blocks
and the routing kept:

=========================  ==================================================
Qwen2MoeSparseMoeBlock     softmax top-k, renormalised iff norm_topk_prob;
                           shared_expert scaled by sigmoid(shared_expert_gate)
Qwen3MoeSparseMoeBlock     softmax top-k, renormalised iff norm_topk_prob
MixtralSparseMoeBlock      softmax top-k, renormalised
DeepseekV2Moe              softmax of float32 logits, top-k ("greedy") or
                           group-limited ("group_limited_greedy", groups
                           scored by their best expert), times
                           routed_scaling_factor; shared_experts
DeepseekV3MoE              sigmoid of float32 logits + e_score_correction_bias
                           for the choice, group-limited (groups scored by
                           the sum of their two best), renormalised iff
                           norm_topk_prob, times routed_scaling_factor;
                           shared_experts
=========================  ==================================================

Others can be added with ``register_moe_block``. The blocks run inference
only (no autograd through the experts, no router jitter, no router-logit
outputs for auxiliary losses).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .. import _fused, ops  # noqa: F401  (ops: the torch.library registration, for torch.compile)
from .._fused import QuantizedExperts

__all__ = [
    "MoeSpec",
    "QMoeSparseMoeBlock",
    "find_moe_blocks",
    "quantize_moe",
    "register_moe_block",
    "restore_moe",
]

log = logging.getLogger("qmoe")


@dataclass
class MoeSpec:
    """What qmoe needs to know of one MoE block of a model."""

    router: nn.Module  # has .weight [E, H]
    experts: nn.Module  # has .gate_up_proj [E, 2I, H] (gate rows first) and .down_proj [E, H, I]
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    num_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    scaling_factor: float = 1.0
    correction_bias: str | None = None  # name of a [E] buffer of the router
    logits_fp32: bool = False  # logits = F.linear(x.float(), weight.float()) (else in x's dtype)
    shared: nn.Module | None = None  # MLP with gate_proj, up_proj, down_proj (SiLU)
    shared_gate: nn.Module | None = None  # Linear(H, 1): shared output * sigmoid(gate(x))
    shared_name: str | None = None  # attribute names, kept on the replacement block
    shared_gate_name: str | None = None


def _qwen_spec(block) -> MoeSpec:
    g = block.gate
    shared = getattr(block, "shared_expert", None)
    sgate = getattr(block, "shared_expert_gate", None)
    return MoeSpec(router=g, experts=block.experts, top_k=int(g.top_k),
                   renormalize=bool(g.norm_topk_prob), shared=shared, shared_gate=sgate,
                   shared_name="shared_expert" if shared is not None else None,
                   shared_gate_name="shared_expert_gate" if sgate is not None else None)


def _mixtral_spec(block) -> MoeSpec:
    g = block.gate
    return MoeSpec(router=g, experts=block.experts, top_k=int(g.top_k), renormalize=True)


def _deepseek_v2_spec(block) -> MoeSpec:
    g = block.gate
    if g.topk_method == "greedy":
        groups = kept = 1
    elif g.topk_method == "group_limited_greedy":
        groups, kept = int(g.num_group), int(g.topk_group)
    else:
        raise NotImplementedError(f"DeepSeek-V2 topk_method {g.topk_method!r}")
    return MoeSpec(router=g, experts=block.experts, top_k=int(g.top_k), num_groups=groups,
                   topk_groups=kept, group_score="max",
                   scaling_factor=float(g.routed_scaling_factor), logits_fp32=True,
                   shared=block.shared_experts, shared_name="shared_experts")


def _deepseek_v3_spec(block) -> MoeSpec:
    g = block.gate
    return MoeSpec(router=g, experts=block.experts, top_k=int(g.top_k), scoring="sigmoid",
                   renormalize=bool(g.norm_topk_prob), num_groups=int(g.num_group),
                   topk_groups=int(g.topk_group), group_score="top2_sum",
                   scaling_factor=float(g.routed_scaling_factor),
                   correction_bias="e_score_correction_bias", logits_fp32=True,
                   shared=block.shared_experts, shared_name="shared_experts")


_SPECS: dict[str, Callable[[nn.Module], MoeSpec]] = {
    "Qwen2MoeSparseMoeBlock": _qwen_spec,
    "Qwen3MoeSparseMoeBlock": _qwen_spec,
    "MixtralSparseMoeBlock": _mixtral_spec,
    "DeepseekV2Moe": _deepseek_v2_spec,
    "DeepseekV3MoE": _deepseek_v3_spec,
}


def register_moe_block(class_name: str, spec: Callable[[nn.Module], MoeSpec]) -> None:
    """Teaches quantize_moe a block class: ``spec(block)`` describes its router,
    experts and shared experts."""
    _SPECS[class_name] = spec


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, MoeSpec]]:
    """(name, block, spec) of every supported MoE block of the model."""
    found = []
    for name, module in model.named_modules():
        spec_fn = _SPECS.get(type(module).__name__)
        if spec_fn is not None:
            found.append((name, module, spec_fn(module)))
    return found


def _unsupported_blocks(model: nn.Module) -> list[str]:
    names = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls not in _SPECS and not isinstance(module, QMoeSparseMoeBlock) and \
                hasattr(module, "experts") and hasattr(module, "gate"):
            names.append(f"{name} ({cls})")
    return names


# ---------------------------------------------------------------------------
# Quantization of one block
# ---------------------------------------------------------------------------


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLU", "SiLUActivation") or \
        act is F.silu


@dataclass(frozen=True)
class _Encoding:
    weight_bits: int
    group_size: int
    asym: bool
    fp8: str | None

    @property
    def name(self) -> str:
        if self.fp8:
            return f"fp8_{self.fp8}"
        if self.weight_bits == 16:
            return "16-bit"
        return f"int{self.weight_bits}" + ("_asym" if self.asym else "")


def _quantize(w: torch.Tensor, enc: _Encoding, dtype: torch.dtype, what: str) -> QuantizedExperts:
    w = w.detach()
    K = int(w.shape[-1])
    if enc.fp8 is None and enc.weight_bits == 16:
        return QuantizedExperts(w.to(dtype).contiguous(), weight_bits=16, group_size=K)
    if K % enc.group_size != 0:
        raise ValueError(
            f"group_size ({enc.group_size}) must divide the input features of {what} "
            f"({K}); choose a group_size that divides it"
        )
    return _fused.quantize_experts(w, weight_bits=enc.weight_bits, group_size=enc.group_size,
                                   asym=enc.asym, dtype=dtype, fp8=enc.fp8)


class QMoeSparseMoeBlock(nn.Module):
    """A transformers MoE block whose forward is one qmoe.fused_moe call.

    Keeps the model's router module (as ``gate``; only its weight and bias buffer
    are used) and, where they cannot run inside the fused call (biases, another
    activation), the shared expert module under its original name.
    """

    def __init__(self, spec: MoeSpec, enc: _Encoding, quantize_shared: bool, name: str = ""):
        super().__init__()
        experts = spec.experts
        for attr, want in (("has_gate", True), ("has_bias", False), ("is_transposed", False),
                           ("is_concatenated", True)):
            if getattr(experts, attr, want) != want:
                raise NotImplementedError(f"{name}: experts with {attr}={not want} are not supported")
        if hasattr(experts, "act_fn") and not _is_silu(experts.act_fn):
            raise NotImplementedError(
                f"{name}: the experts' activation is {type(experts.act_fn).__name__}; "
                "qmoe fuses SiLU(gate)·up only"
            )
        gu, dn = experts.gate_up_proj, experts.down_proj
        if gu.dim() != 3 or dn.dim() != 3:
            raise NotImplementedError(f"{name}: experts are not stored as 3-D gate_up_proj/down_proj")
        dtype = gu.dtype
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"{name}: the experts are {dtype}; qmoe runs bfloat16 or float16 activations: "
                "convert the model first (model.to(torch.bfloat16))"
            )
        E, two_i, H = (int(s) for s in gu.shape)
        self.num_experts, self.hidden_size, self.intermediate_size = E, H, two_i // 2
        self.encoding = enc.name
        self.top_k = spec.top_k
        self.scoring = spec.scoring
        self.renormalize = spec.renormalize
        self.num_groups = spec.num_groups
        self.topk_groups = spec.topk_groups
        self.group_score = spec.group_score
        self.scaling_factor = spec.scaling_factor
        self.correction_bias_name = spec.correction_bias
        self.logits_fp32 = spec.logits_fp32
        self.gate = spec.router

        self._store("gate_up", _quantize(gu, enc, dtype, f"{name}.experts.gate_up_proj"))
        self._store("down", _quantize(dn, enc, dtype, f"{name}.experts.down_proj"))

        # Shared experts: inside the fused call (16-bit, or quantized), else as a module.
        self.shared_intermediate = 0
        self._shared_module_name = None
        self._shared_gate_name = spec.shared_gate_name
        shared, sgate = spec.shared, spec.shared_gate
        fusable = shared is not None and all(
            isinstance(getattr(shared, p, None), nn.Linear) and getattr(shared, p).bias is None
            for p in ("gate_proj", "up_proj", "down_proj")) and _is_silu(getattr(shared, "act_fn", None)) \
            and (sgate is None or (isinstance(sgate, nn.Linear) and sgate.bias is None
                                   and sgate.out_features == 1))
        if shared is not None and fusable:
            w_gu = torch.cat([shared.gate_proj.weight, shared.up_proj.weight], 0)[None]
            w_d = shared.down_proj.weight[None]
            senc = enc if quantize_shared else _Encoding(16, 0, False, None)
            self._store("shared_gate_up", _quantize(w_gu, senc, dtype, f"{name}.{spec.shared_name}"))
            self._store("shared_down", _quantize(w_d, senc, dtype, f"{name}.{spec.shared_name}"))
            self.shared_intermediate = int(shared.down_proj.weight.shape[1])
            self.shared_encoding = senc.name
            if sgate is not None:
                self.register_buffer("shared_gate", sgate.weight.detach().reshape(-1).to(dtype).clone())
            else:
                self.shared_gate = None
        else:
            self.shared_gate = None
            if shared is not None:  # runs as the model's module
                self._shared_module_name = spec.shared_name
                self.add_module(spec.shared_name, shared)
                if sgate is not None:
                    self.add_module(spec.shared_gate_name, sgate)

    def _store(self, prefix: str, q: QuantizedExperts):
        self.register_buffer(f"{prefix}_qweight", q.qweight)
        self.register_buffer(f"{prefix}_scales", q.scales)
        self.register_buffer(f"{prefix}_zeros", q.zeros)
        setattr(self, f"_{prefix}_meta", (q.weight_bits, q.group_size, q.asym))

    def _experts(self, prefix: str) -> QuantizedExperts:
        bits, gs, asym = getattr(self, f"_{prefix}_meta")
        return QuantizedExperts(getattr(self, f"{prefix}_qweight"), getattr(self, f"{prefix}_scales"),
                                getattr(self, f"{prefix}_zeros"), bits, gs, asym)

    def extra_repr(self) -> str:
        s = (f"experts={self.num_experts}, hidden={self.hidden_size}, "
             f"intermediate={self.intermediate_size}, top_k={self.top_k}, "
             f"encoding={self.encoding}, scoring={self.scoring}")
        if self.shared_intermediate:
            s += f", shared={self.shared_intermediate} ({self.shared_encoding})"
        return s

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        w = self.gate.weight
        logits = F.linear(x.float(), w.float()) if self.logits_fp32 else F.linear(x, w.to(x.dtype))
        bias = getattr(self.gate, self.correction_bias_name) if self.correction_bias_name else None
        kw = {}
        if self.shared_intermediate:
            kw = dict(shared_gate_up_weights=self._experts("shared_gate_up"),
                      shared_down_weights=self._experts("shared_down"), shared_gate=self.shared_gate)
        out = _fused.fused_moe(
            x, self._experts("gate_up"), self._experts("down"), router_logits=logits,
            top_k=self.top_k, scoring=self.scoring, renormalize=self.renormalize,
            correction_bias=bias, num_groups=self.num_groups, topk_groups=self.topk_groups,
            group_score=self.group_score, scaling_factor=self.scaling_factor, **kw)
        if self._shared_module_name is not None:
            shared = getattr(self, self._shared_module_name)(x)
            if self._shared_gate_name is not None:
                shared = torch.sigmoid(getattr(self, self._shared_gate_name)(x)) * shared
            out = out + shared
        return out.reshape(shape)


# ---------------------------------------------------------------------------
# The model-level calls
# ---------------------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, new: nn.Module):
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_moe(model: nn.Module, weight_bits: int = 4, group_size: int = 128, asym: bool = False,
                 fp8: str | None = None, *, quantize_shared: bool = False,
                 keep_original: bool = False,
                 filter: Callable[[str, nn.Module], bool] | None = None) -> nn.Module:
    """Quantizes the routed experts of every supported MoE block and runs the blocks
    with qmoe.fused_moe. In place; returns the model.

    Args:
        model: a transformers model (or any module holding supported MoE blocks),
            in bfloat16 or float16, on the CPU or a CUDA device.
        weight_bits: 8, 4 or 2 (qmoe's integer encodings), or 16 to keep the
            experts in the model's dtype (then only the fused layer changes).
        group_size: elements of one scale (and zero) along the input features;
            must divide the hidden size and the expert intermediate size.
        asym: zero-point (unsigned) integer codes.
        fp8: "e4m3" or "e5m2" for fp8 experts (overrides weight_bits).
        quantize_shared: quantize the shared experts with the same encoding (by
            default they keep the model's dtype, fused into the same call).
        keep_original: keep the original blocks (restore_moe puts them back);
            otherwise their float expert weights are freed.
        filter: optional predicate (name, block) choosing the blocks to convert.

    Raises:
        ValueError: no supported MoE block, a float32 model, a group_size that
            does not divide a dimension (nothing is converted then).
    """
    if fp8 is not None and fp8 not in ("e4m3", "e5m2"):
        raise ValueError(f"fp8 must be None, 'e4m3' or 'e5m2', got {fp8!r}")
    if fp8 is None and weight_bits not in (16, 8, 4, 2):
        raise ValueError(f"weight_bits must be one of 16, 8, 4, 2, got {weight_bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    enc = _Encoding(8 if fp8 else int(weight_bits), int(group_size), bool(asym), fp8)
    if enc.asym and (fp8 or enc.weight_bits == 16):
        raise ValueError("asym applies to the integer encodings (weight_bits 8, 4, 2) only")

    blocks = [(n, b, s) for n, b, s in find_moe_blocks(model) if filter is None or filter(n, b)]
    if not blocks:
        others = _unsupported_blocks(model)
        raise ValueError(
            "quantize_moe: no supported MoE block in the model"
            + (f"; unsupported: {', '.join(others[:4])}" if others else "")
            + f" (supported: {', '.join(sorted(_SPECS))}; see register_moe_block)"
        )
    # Check every block before converting any (dimensions, dtypes).
    for name, _, spec in blocks:
        gu = spec.experts.gate_up_proj
        if gu.dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(
                f"{name}: the experts are {gu.dtype}; qmoe runs bfloat16 or float16 activations: "
                "convert the model first (model.to(torch.bfloat16))"
            )
        if enc.weight_bits != 16 or enc.fp8:
            H, I = int(gu.shape[2]), int(spec.experts.down_proj.shape[2])
            dims = [H, I]
            if quantize_shared and spec.shared is not None:
                dims.append(int(spec.shared.down_proj.weight.shape[1]))
            for d in dims:
                if d % enc.group_size:
                    raise ValueError(
                        f"{name}: group_size ({enc.group_size}) must divide the hidden size "
                        f"({H}) and the expert intermediate sizes ({dims[1:]})"
                    )
    originals = getattr(model, "_qmoe_originals", {})
    count = len(blocks)
    while blocks:  # one block at a time: its float experts are freed before the next
        name, block, spec = blocks.pop(0)
        _set_submodule(model, name, QMoeSparseMoeBlock(spec, enc, quantize_shared, name))
        if keep_original:
            originals[name] = block
        del block, spec
    if keep_original:
        object.__setattr__(model, "_qmoe_originals", originals)
    log.info("qmoe: %d MoE blocks now run qmoe.fused_moe (%s experts)", count, enc.name)
    return model


def restore_moe(model: nn.Module) -> nn.Module:
    """Puts back the blocks that quantize_moe(..., keep_original=True) replaced."""
    originals = getattr(model, "_qmoe_originals", None)
    if not originals:
        raise ValueError("restore_moe: the model has no kept original blocks "
                         "(quantize_moe(..., keep_original=True))")
    for name, block in originals.items():
        _set_submodule(model, name, block)
    object.__setattr__(model, "_qmoe_originals", {})
    return model
