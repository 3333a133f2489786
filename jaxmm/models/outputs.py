"""Named model outputs: small pytree dataclasses so each family can add fields."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class CausalLMOutput:
  """logits f32[B, T, V]. `kept`: per pruning stage, i32[B, k] original indices of kept visual
  tokens (None without a schedule). `captured`: opt-in per-layer captures (None when off)."""
  logits: jax.Array
  kept: Any = None
  captured: Any = None
