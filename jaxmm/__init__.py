"""jaxmm: JAX/Flax ports of LLaVA-style models, visual-token pruning, and research models.

Public API:
  m = jaxmm.load(path)                   # a folder written by `jaxmm convert` or training
  out = jaxmm.forward(m, input_ids=..., pixel_values=..., attention_mask=...)
  ids = jaxmm.generate(m, input_ids=..., pixel_values=..., attention_mask=..., max_new_tokens=...)
"""
import importlib

# Imported on first use (PEP 562), so that importing a light submodule (e.g. the lmms-eval
# registry entry `jaxmm.eval.lmms_plugin`, loaded by every lmms-eval run) does not import JAX.
_PUBLIC = {"Model": "jaxmm.api", "load": "jaxmm.api", "forward": "jaxmm.api",
           "generate": "jaxmm.api", "Capture": "jaxmm.analysis.capture"}

__all__ = ["Model", "load", "forward", "generate", "Capture"]


def __getattr__(name: str):
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  try:
    return importlib.import_module(f"{__name__}.{name}")   # jaxmm.api, jaxmm.sharding, ...
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{name}":
      raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
