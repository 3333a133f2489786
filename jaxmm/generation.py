"""Greedy generation with a KV cache: a jitted prefill, then one jitted decode loop.

The decode loop is a `lax.while_loop` that stops when every sequence has emitted EOS, so it
compiles once per (batch, prompt length, max_new_tokens) and never returns to the host per token.
Batches are left padded: every prompt ends at the same slot, so all sequences write the cache in
lockstep.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import inputs as inputs_lib
from jaxmm.errors import InputError
from jaxmm.models import llama, llava


def _text_parts(cfg, params):
  """(decoder config, decoder params) of a llava or llama model."""
  return (cfg.text, params["llm"]) if isinstance(cfg, llava.Config) else (cfg, params)


def _embeds(cfg, params, ids, px):
  if isinstance(cfg, llava.Config):
    return llava.input_embeddings(cfg, params, ids, px)
  return llama.embed(cfg, params, ids)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens"))
def _prefill(cfg, params, ids_BxT, px, mask_BxT, pos_BxT, max_new_tokens):
  """Runs the prompt, filling caches of S = T + max_new_tokens slots.

  Returns (last logits f32[B, V], (k, v) f[L, B, S, G, K], kv_valid bool[B, S]).
  """
  tc, lp = _text_parts(cfg, params)
  b, t = ids_BxT.shape
  x = _embeds(cfg, params, ids_BxT, px)
  kv_valid = jnp.concatenate([mask_BxT, jnp.zeros((b, max_new_tokens), bool)], axis=1)
  shape = (tc.num_layers, b, t + max_new_tokens, tc.num_kv_heads, tc.head_dim)
  kv = (jnp.zeros(shape, x.dtype), jnp.zeros(shape, x.dtype))
  slots = jnp.broadcast_to(jnp.arange(t), (b, t))
  h, kv = llama.run_layers(tc, lp["layers"], x, pos_BxT, llama.attention_mask(slots, kv_valid), kv)
  return llama.lm_logits(tc, lp, h[:, -1:])[:, 0], kv, kv_valid


@functools.partial(jax.jit, static_argnames=("tc", "max_new_tokens"))
def _decode(tc, lp, logits_BxV, kv, kv_valid_BxS, next_pos_B, max_new_tokens):
  """Greedy loop. Returns (tokens i32[B, max_new_tokens], number of steps run)."""
  b = logits_BxV.shape[0]
  t0 = kv_valid_BxS.shape[1] - max_new_tokens
  eos = jnp.asarray(tc.eos_token_ids or (-1,), jnp.int32)
  pad = tc.pad_token_id if tc.pad_token_id is not None else (tc.eos_token_ids or (0,))[0]
  tok = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
  state = (1, tok, jnp.isin(tok, eos), out, kv, kv_valid_BxS, next_pos_B)

  def cond(s):
    return (s[0] < max_new_tokens) & ~jnp.all(s[2])

  def body(s):
    step, tok, done, out, kv, valid, pos = s
    slot = t0 + step - 1  # where the previous token's keys/values go
    valid = valid.at[:, slot].set(True)
    mask = llama.attention_mask(jnp.full((b, 1), slot), valid)
    x = llama.embed(tc, lp, tok[:, None])
    h, kv = llama.run_layers(tc, lp["layers"], x, pos[:, None], mask, kv, slot)
    nxt = jnp.argmax(llama.lm_logits(tc, lp, h)[:, 0], axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad, nxt)
    return (step + 1, nxt, done | jnp.isin(nxt, eos), out.at[:, step].set(nxt), kv, valid, pos + 1)

  s = jax.lax.while_loop(cond, body, state)
  return s[3], s[0]


def generate(cfg, params, *, input_ids, pixel_values=None, attention_mask=None,
             max_new_tokens: int = 32) -> np.ndarray:
  """Greedy decoding. Prompts must be left padded. Returns the new tokens i32[B, n], n <=
  max_new_tokens (the loop stops once every sequence has produced EOS; finished sequences are
  filled with the pad id)."""
  if max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  ids, mask, pos = inputs_lib.text_inputs(input_ids, attention_mask)
  if not bool(np.all(np.asarray(mask)[:, -1])):
    raise InputError("generation needs left padding: the last position of every prompt must be valid")
  px = llava.check_images(cfg, ids, pixel_values) if isinstance(cfg, llava.Config) else None
  logits, kv, valid = _prefill(cfg, params, ids, px, mask, pos, max_new_tokens)
  tc, lp = _text_parts(cfg, params)
  out, steps = _decode(tc, lp, logits, kv, valid, pos[:, -1] + 1, max_new_tokens)
  return np.asarray(out)[:, :int(steps)]
