"""Opt-in capture of per-layer decoder quantities (a static, hashable forward argument).

`jaxmm.forward(m, ..., capture=Capture(hidden=True, queries=True))` makes the output's `captured`
a dict (LLaVA family, no pruning schedule):
  "hidden"   f[L+1, B, T, D]    the embeddings entering layer 0, then each layer's output (the last
                                one before the final norm, unlike transformers' hidden_states)
  "queries"  f[L, B, T, H, dh]  every layer's query states before RoPE
  "visual"   bool[B, T]         which positions are visual tokens (always present)
The captures are scan outputs of the one decoder scan; with `capture=None` the forward is the
plain one and `captured` is None.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Capture:
  hidden: bool = False
  queries: bool = False

  def names(self) -> tuple:
    """The per-layer names to stack in `llama.run_layers` (sorted, hashable)."""
    return tuple(n for n in ("hidden", "queries") if getattr(self, n))
