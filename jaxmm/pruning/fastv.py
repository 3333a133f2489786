"""FastV (pruning.md §6): keep the visual tokens the last prompt token attends to most.

The score is the layer-(K-1) attention row of the last prompt position, post-softmax and
averaged over heads; the model computes only that row (`attention.last_row`).
"""
import jax.numpy as jnp

from jaxmm.pruning.state import TokenState

NEEDS = frozenset({"attn_row"})


def score(state_1: TokenState, aux_1: dict, key, k: int):
  """f32[N], -inf on non-visual slots. aux_1["attn_row"]: f32[S], S >= N; slots >= N are KV-cache
  slots reserved for decoding (masked, so ~0) and are ignored."""
  del key, k
  n = state_1.valid.shape[0]
  row = aux_1["attn_row"][:n].astype(jnp.float32)
  return jnp.where(state_1.visual & state_1.valid, row, -jnp.inf)
