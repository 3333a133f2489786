"""Named model outputs: small pytree dataclasses so each family can add fields."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class CausalLMOutput:
  """logits f32[B, T, V]. With a pruning schedule: `kept`, per stage, i32[B, k] original indices of
  the kept visual tokens, and `origin` i32[B, T'] the original index of each logits row (both None
  without a schedule). `captured`: opt-in per-layer captures (None when off)."""
  logits: jax.Array
  kept: Any = None
  origin: Any = None
  captured: Any = None
