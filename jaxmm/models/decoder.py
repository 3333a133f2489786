"""The decoder interface that generic code (segments, prefill, decode loop, pruning stages,
analyses, training) depends on, and the attention mask as data.

A decoder is a small, hashable object (a frozen dataclass over its config, so it can be a static
jit argument) with five operations over its own params subtree:

  embed(params, ids_BxT)                      -> f[B, T, D]
  rope(positions)                             -> the rotary tables of positions i32[B, T]
                                                 (1-D RoPE) or i32[B, T, 3] (M-RoPE)
  run(params, x_BxTxD, positions, mask_BxTxS, ...) -> LayersOut (a layer range, one scan)
  logits(params, h_BxTxD)                     -> f32[B, T, V] (final norm + LM head)
  kv_shape(batch, slots)                      -> the per-layer KV-cache shape (fixed layout)

and `num_layers`. LLaMA implements it (`llama.Decoder`); a Qwen2 decoder (qkv bias, M-RoPE)
implements the same five without touching any generic module. Masks are plain boolean data
built by `attention_mask` (validity and causal order), in the spirit of big_vision's
`make_attn_mask`, so the decoder never decides what is visible.
"""
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp

# What `run` can capture. Carry captures (of the range's last layer): "queries" f[B, T, H, d_h]
# (pre-RoPE), "attn_row" f32[B, S] (the last query's attention, head-averaged), "attn_logp"
# f32[B, H, T, S] (log attention probabilities; masked keys are very negative). Stacked
# captures (one per layer of the range): "queries", "hidden" (each layer's output f[B, T, D]).
CARRY_CAPTURES = ("queries", "attn_row", "attn_logp")
STACK_CAPTURES = ("hidden", "queries")


@flax.struct.dataclass
class LayersOut:
  """What running a layer range returns, always the same structure.

  x: f[B, T, D] leaving the range; kv: (k, v) f[n, B, S, G, K] caches of its n layers, or None;
  last: {name: capture of the range's last layer}; stacked: {name: f[n, ...] per layer}.
  """
  x: jax.Array
  kv: Any = None
  last: dict = flax.struct.field(default_factory=dict)
  stacked: dict = flax.struct.field(default_factory=dict)


class Decoder(Protocol):
  """The interface; see the module docstring. Also: num_layers, and the token ids generation
  needs (eos_token_ids, pad_token_id)."""
  num_layers: int
  eos_token_ids: tuple
  pad_token_id: int | None

  def embed(self, params, ids_BxT) -> jax.Array: ...

  def rope(self, positions) -> Any: ...

  def run(self, params, x_BxTxD, positions, mask_BxTxS, kv=None, write_idx=0, start: int = 0,
          end: int | None = None, capture: tuple = (), stack: tuple = ()) -> LayersOut: ...

  def logits(self, params, h_BxTxD) -> jax.Array: ...

  def kv_shape(self, batch: int, slots: int) -> tuple: ...


def attention_mask(q_slot_BxT, kv_valid_BxS):
  """bool[B, T, S]: a query sees valid key slots at or before its own slot (causal by slot)."""
  s = jnp.arange(kv_valid_BxS.shape[1])
  return (s[None, None, :] <= q_slot_BxT[:, :, None]) & kv_valid_BxS[:, None, :]


def causal_mask(valid_BxT):
  """bool[B, T, T]: the prompt's own causal mask (query slot t sees valid slots <= t)."""
  slots = jnp.broadcast_to(jnp.arange(valid_BxT.shape[1]), valid_BxT.shape)
  return attention_mask(slots, valid_BxT)
