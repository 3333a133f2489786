"""Greedy generation with KV caches: a jitted prefill (running the pruning schedule), then one
jitted decode loop.

The prefill is the one prefill path (`models.segments.prefill`): it splits the decoder into
segments at the schedule's pruning layers; each segment's KV cache holds only that segment's
tokens. The decode loop is a `lax.while_loop` over all segments that stops when every sequence
has emitted EOS: it compiles once per (batch, prompt length, schedule, max_new_tokens), never
re-scores, and never returns to the host per token. Batches are left padded, so every prompt
ends at the same slot and sequences write in lockstep. Only the family and decoder interfaces
are used: no model family is imported here.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import inputs as inputs_lib
from jaxmm import registry, sharding
from jaxmm.errors import InputError
from jaxmm.models import core, segments as seg_lib
from jaxmm.models.decoder import attention_mask


@functools.partial(jax.jit, static_argnames=("name", "cfg", "schedule", "max_new_tokens"))
def _prefill(name, cfg, params, arrays, keys, schedule, max_new_tokens):
  """Runs the prompt through the schedule. Returns (last logits f32[B, V], segments, kept)."""
  dec, dp = core.decoder_of(name, cfg, params)
  state = registry.family_module(name).token_state(cfg, params, arrays)
  pre = seg_lib.prefill(dec, dp, state, schedule, keys, max_new_tokens)
  return dec.logits(dp, pre.segments[-1].state.hidden[:, -1:])[:, 0], pre.segments, pre.kept


def _decode_step(dec, dp, segs, caches, tok_B, step):
  """One token through every segment; returns (next-token logits f32[B, V], caches)."""
  b = tok_B.shape[0]
  x = dec.embed(dp, tok_B[:, None])
  out = []
  for seg, (kv, valid, pos) in zip(segs, caches):
    slot = seg.state.valid.shape[1] + step - 1  # where the previous token's keys/values go
    valid = valid.at[:, slot].set(True)
    mask = attention_mask(jnp.full((b, 1), slot), valid)
    res = dec.run(dp, x, pos[:, None], mask, kv, slot, seg.start, seg.end)
    x = res.x
    out.append((res.kv, valid, pos + 1))
  return dec.logits(dp, x)[:, 0], out


@functools.partial(jax.jit, static_argnames=("dec", "max_new_tokens"))
def _decode(dec, dp, logits_BxV, segs, max_new_tokens):
  """Greedy loop. Returns (tokens i32[B, max_new_tokens], number of steps run)."""
  b = logits_BxV.shape[0]
  eos = jnp.asarray(dec.eos_token_ids or (-1,), jnp.int32)
  pad = dec.pad_token_id if dec.pad_token_id is not None else (dec.eos_token_ids or (0,))[0]
  tok = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
  # Each segment's next position: its last (text) token's position + 1 (on every axis of
  # multi-axis positions, which agree on text). With `compact` positions this is shifted down
  # by the tokens pruned before that segment.
  caches = [(s.kv, s.kv_valid, s.state.positions[:, -1] + 1) for s in segs]

  def cond(c):
    return (c[0] < max_new_tokens) & ~jnp.all(c[2])

  def body(c):
    step, tok, done, out, caches = c
    logits, caches = _decode_step(dec, dp, segs, caches, tok, step)
    nxt = jnp.where(done, pad, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return step + 1, nxt, done | jnp.isin(nxt, eos), out.at[:, step].set(nxt), caches

  c = jax.lax.while_loop(cond, body, (1, tok, jnp.isin(tok, eos), out, caches))
  return c[3], c[0]


def generate(cfg, params, *, max_new_tokens: int = 32, schedule=None, seed: int = 0,
             example_ids=None, return_kept: bool = False, **inputs):
  """Greedy decoding. `inputs`: the family's inputs with transformers' names (input_ids,
  attention_mask, pixel_values, position_ids, ...); prompts must be left padded. `schedule`
  (text or parsed) prunes visual tokens at prefill; random pruning draws from
  fold_in(PRNGKey(seed), example id), with `example_ids` defaulting to the row numbers.
  Returns the new tokens i32[B, n], n <= max_new_tokens (the loop stops once every sequence has
  produced EOS; finished sequences are filled with the pad id). With `return_kept`, returns
  (tokens, kept, schedule): per stage the original indices i32[B, k] of the kept visual tokens
  (-1 padded) and the schedule as resolved for this batch."""
  if max_new_tokens < 1:
    raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  name = registry.family_of(cfg)
  prepared = core.prepare(name, cfg, inputs)
  arrays = prepared.arrays
  if not bool(np.all(np.asarray(arrays["attention_mask"])[:, -1])):
    raise InputError("generation needs left padding: the last position of every prompt must be valid")
  sched = core.resolve(name, cfg, prepared, schedule)
  b = arrays["input_ids"].shape[0]
  arrays, keys = sharding.place_batch((arrays, inputs_lib.example_keys(seed, b, example_ids)), b)
  logits, segs, kept = _prefill(name, cfg, params, arrays, keys, sched, max_new_tokens)
  dec, dp = core.decoder_of(name, cfg, params)
  out, steps = _decode(dec, dp, logits, segs, max_new_tokens)
  tokens = np.asarray(out)[:, :int(steps)]
  return (tokens, tuple(np.asarray(k) for k in kept), sched) if return_kept else tokens
