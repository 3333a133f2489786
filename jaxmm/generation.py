"""Greedy generation with KV caches: a jitted prefill (running the pruning schedule), then one
jitted decode loop.

The prefill splits the decoder into segments at the schedule's pruning layers; each segment's
KV cache holds only that segment's tokens. The decode loop is a `lax.while_loop` over all
segments that stops when every sequence has emitted EOS: it compiles once per (batch, prompt
length, schedule, max_new_tokens), never re-scores, and never returns to the host per token.
Batches are left padded, so every prompt ends at the same slot and sequences write in lockstep.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import inputs as inputs_lib
from jaxmm.errors import InputError
from jaxmm.models import llama, llava, segments as seg_lib
from jaxmm.pruning.state import TokenState


def text_parts(cfg, params):
  """(decoder config, decoder params) of a llava or llama model."""
  return (cfg.text, params["llm"]) if isinstance(cfg, llava.Config) else (cfg, params)


def _token_state(cfg, params, ids_BxT, px, mask_BxT, pos_BxT) -> TokenState:
  if isinstance(cfg, llava.Config):
    return llava.token_state(cfg, params, ids_BxT, px, mask_BxT, pos_BxT)
  return TokenState(hidden=llama.embed(cfg, params, ids_BxT), positions=pos_BxT, valid=mask_BxT,
                    visual=jnp.zeros_like(mask_BxT), origin=jnp.broadcast_to(
                        jnp.arange(ids_BxT.shape[1], dtype=jnp.int32), ids_BxT.shape))


def _check(cfg, ids, pixel_values, schedule):
  """(pixel values or None, resolved schedule) after the host-side checks."""
  if isinstance(cfg, llava.Config):
    return llava.check_inputs(cfg, ids, pixel_values, schedule)
  if schedule:
    raise InputError("a pruning schedule needs visual tokens; this is a text-only model")
  return None, ()


@functools.partial(jax.jit, static_argnames=("cfg", "schedule", "max_new_tokens"))
def _prefill(cfg, params, ids_BxT, px, mask_BxT, pos_BxT, keys, schedule, max_new_tokens):
  """Runs the prompt through the schedule. Returns (last logits f32[B, V], segments, kept)."""
  tc, lp = text_parts(cfg, params)
  state = _token_state(cfg, params, ids_BxT, px, mask_BxT, pos_BxT)
  segs, kept = seg_lib.prefill(tc, lp["layers"], state, schedule, keys, max_new_tokens)
  return llama.lm_logits(tc, lp, segs[-1].state.hidden[:, -1:])[:, 0], segs, kept


def _decode_step(tc, lp, ranges, segs, caches, tok_B, step):
  """One token through every segment; returns (next-token logits f32[B, V], caches)."""
  b = tok_B.shape[0]
  x = llama.embed(tc, lp, tok_B[:, None])
  out = []
  for (start, end), seg, (kv, valid, pos) in zip(ranges, segs, caches):
    slot = seg.state.valid.shape[1] + step - 1  # where the previous token's keys/values go
    valid = valid.at[:, slot].set(True)
    mask = llama.attention_mask(jnp.full((b, 1), slot), valid)
    x, kv = llama.run_layers(tc, lp["layers"], x, pos[:, None], mask, kv, slot, start, end)
    out.append((kv, valid, pos + 1))
  return llama.lm_logits(tc, lp, x)[:, 0], out


@functools.partial(jax.jit, static_argnames=("tc", "ranges", "max_new_tokens"))
def _decode(tc, lp, logits_BxV, segs, ranges, max_new_tokens):
  """Greedy loop. Returns (tokens i32[B, max_new_tokens], number of steps run)."""
  b = logits_BxV.shape[0]
  eos = jnp.asarray(tc.eos_token_ids or (-1,), jnp.int32)
  pad = tc.pad_token_id if tc.pad_token_id is not None else (tc.eos_token_ids or (0,))[0]
  tok = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
  # Each segment's next position: its last (text) token's position + 1. With `compact` positions
  # this is shifted down by the tokens pruned before that segment.
  caches = [(s.kv, s.kv_valid, s.state.positions[:, -1] + 1) for s in segs]

  def cond(c):
    return (c[0] < max_new_tokens) & ~jnp.all(c[2])

  def body(c):
    step, tok, done, out, caches = c
    logits, caches = _decode_step(tc, lp, ranges, segs, caches, tok, step)
    nxt = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return step + 1, nxt, done | jnp.isin(nxt, eos), out.at[:, step].set(nxt), caches

  c = jax.lax.while_loop(cond, body, (1, tok, jnp.isin(tok, eos), out, caches))
  return c[3], c[0]


def generate(cfg, params, *, input_ids, pixel_values=None, attention_mask=None,
             max_new_tokens: int = 32, schedule=None, seed: int = 0,
             example_ids=None) -> np.ndarray:
  """Greedy decoding. Prompts must be left padded. `schedule` (text or parsed) prunes visual
  tokens at prefill; random pruning draws from fold_in(PRNGKey(seed), example id), with
  `example_ids` defaulting to the row numbers. Returns the new tokens i32[B, n], n <=
  max_new_tokens (the loop stops once every sequence has produced EOS; finished sequences are
  filled with the pad id)."""
  if max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  ids, mask, pos = inputs_lib.text_inputs(input_ids, attention_mask)
  if not bool(np.all(np.asarray(mask)[:, -1])):
    raise InputError("generation needs left padding: the last position of every prompt must be valid")
  px, sched = _check(cfg, ids, pixel_values, schedule)
  keys = inputs_lib.example_keys(seed, ids.shape[0], example_ids)
  logits, segs, _ = _prefill(cfg, params, ids, px, mask, pos, keys, sched, max_new_tokens)
  tc, lp = text_parts(cfg, params)
  ranges = tuple(seg_lib.layer_ranges(sched, tc.num_layers))
  out, steps = _decode(tc, lp, logits, segs, ranges, max_new_tokens)
  return np.asarray(out)[:, :int(steps)]
