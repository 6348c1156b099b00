"""Integrations of qmoe with model libraries (imported on demand).

- ``qmoe.integrations.transformers``: quantize the routed experts of a
  Hugging Face transformers (5.x) MoE model and run its MoE blocks with
  ``qmoe.fused_moe``.
"""
