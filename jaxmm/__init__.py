"""jaxmm: JAX/Flax ports of LLaVA-style models, visual-token pruning, and research models.

Public API:
  m = jaxmm.load(path)                   # a folder written by `jaxmm convert` or training
  out = jaxmm.forward(m, input_ids=..., pixel_values=..., attention_mask=...)
  ids = jaxmm.generate(m, input_ids=..., pixel_values=..., attention_mask=..., max_new_tokens=...)
"""
from jaxmm.analysis.capture import Capture
from jaxmm.api import Model, forward, generate, load

__all__ = ["Model", "load", "forward", "generate", "Capture"]
