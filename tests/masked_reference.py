"""A straightforward mask-based pruning reference: no gather, no segments, no cache.

The full sequence runs through every layer. From each stage's layer on, the visual tokens the
stage dropped are excluded as keys (their own rows are computed and ignored). Positions follow
the stage's convention: `preserve` keeps the ids, `compact` renumbers the live tokens.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.inputs import positions_from_mask
from jaxmm.models import llama, llava


def _kept_mask(t, kept_BxK):
  return jax.vmap(lambda row: jnp.zeros(t, bool).at[row].set(True))(kept_BxK)


@functools.partial(jax.jit, static_argnames=("cfg", "schedule", "n_prompt"))
def _masked(cfg, params, ids, px, mask, kept, schedule, n_prompt):
  tc, lp = cfg.text, params["llm"]
  # Only the prompt holds image slots: a generated token equal to the placeholder id is text.
  x = jnp.concatenate([llava.input_embeddings(cfg, params, ids[:, :n_prompt], px),
                       llama.embed(tc, lp, ids[:, n_prompt:])], axis=1)
  alive, t = mask.astype(bool), ids.shape[1]
  image = (ids == cfg.image_token_id) & (jnp.arange(t) < n_prompt)
  pos = positions_from_mask(alive)
  slots = jnp.broadcast_to(jnp.arange(t), ids.shape)
  start = 0
  for stage, k in zip(schedule, kept):
    sub = jax.tree.map(lambda a: a[start:stage.layer], lp["layers"])
    x = llama.run_layers(tc, sub, x, pos, llama.attention_mask(slots, alive)).x
    alive = alive & (~image | _kept_mask(t, k))
    if stage.positions == "compact":
      pos = positions_from_mask(alive)
    start = stage.layer
  sub = jax.tree.map(lambda a: a[start:], lp["layers"])
  x = llama.run_layers(tc, sub, x, pos, llama.attention_mask(slots, alive)).x
  return llama.lm_logits(tc, lp, x), alive


def masked_logits(cfg, params, ids, px, mask, schedule, kept, n_prompt=None):
  """Logits f32[B, T, V] and the final live mask bool[B, T] of the pruned model.

  `schedule`: resolved stages; `kept`: per stage i32[B, k] original indices of kept visual tokens.
  Tokens after the first `n_prompt` (generated text) are never visual.
  """
  n_prompt = ids.shape[1] if n_prompt is None else n_prompt
  logits, alive = _masked(cfg, params, jnp.asarray(ids), px, jnp.asarray(mask),
                          tuple(jnp.asarray(k) for k in kept), tuple(schedule), n_prompt)
  return np.asarray(logits), np.asarray(alive)


def greedy_reference(cfg, params, ids, px, mask, schedule, kept, steps):
  """Greedy decoding by rerunning the masked forward on the growing sequence at every step,
  with the kept sets chosen at prefill (pruning.md §6 KV-cache semantics). The sequence lives
  in a fixed buffer whose unfilled tail is masked out (causality hides it anyway)."""
  b, t = ids.shape
  buf = np.concatenate([np.asarray(ids), np.zeros((b, steps), ids.dtype)], axis=1)
  live = np.concatenate([np.asarray(mask), np.zeros((b, steps), np.asarray(mask).dtype)], axis=1)
  out = []
  for i in range(steps):
    logits, _ = masked_logits(cfg, params, buf, px, live, schedule, kept, n_prompt=t)
    nxt = logits[:, t + i - 1].argmax(-1)
    out.append(nxt)
    buf[:, t + i], live[:, t + i] = nxt, 1
  return np.stack(out, axis=1)
