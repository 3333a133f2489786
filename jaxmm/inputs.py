"""Validation and defaults for model inputs, done on the host before anything is traced."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.errors import InputError


def positions_from_mask(mask_BxT):
  """Position ids that skip padding: the number of valid tokens before each slot (0 on padding)."""
  return jnp.maximum(jnp.cumsum(mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def text_inputs(input_ids, attention_mask=None, position_ids=None):
  """Returns (ids i32[B,T], mask bool[B,T], positions i32[B,T]) after checking shapes."""
  ids = jnp.asarray(input_ids)
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise InputError(f"input_ids must be an integer array [batch, length], got {ids.dtype}{list(ids.shape)}")
  if ids.shape[1] == 0:
    raise InputError("input_ids is empty: the prompt has no tokens")
  mask = jnp.ones(ids.shape, bool) if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
  if mask.shape != ids.shape:
    raise InputError(f"attention_mask shape {list(mask.shape)} != input_ids shape {list(ids.shape)}")
  if not bool(np.all(np.asarray(mask).any(axis=1))):
    raise InputError("attention_mask: some example has no valid token (empty prompt)")
  pos = positions_from_mask(mask) if position_ids is None else jnp.asarray(position_ids, jnp.int32)
  if pos.shape != ids.shape:
    raise InputError(f"position_ids shape {list(pos.shape)} != input_ids shape {list(ids.shape)}")
  return ids.astype(jnp.int32), mask, pos


def example_keys(seed: int, batch: int, example_ids=None):
  """Per-example PRNG keys fold_in(PRNGKey(seed), id); ids default to the row numbers."""
  ids = np.arange(batch) if example_ids is None else np.asarray(example_ids)
  if ids.shape != (batch,):
    raise InputError(f"example_ids must have one id per example ({batch}), got shape {list(ids.shape)}")
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids, jnp.uint32))


def check_vocab(ids_BxT, vocab_size: int, allowed=()) -> None:
  """Token ids must lie in [0, vocab) (`allowed`: placeholder ids outside it, e.g. an added
  image token, which the model replaces before the embedding); the embedding gather would
  otherwise clamp them silently, computing on another token."""
  ids = np.asarray(ids_BxT)
  bad = (ids < 0) | (ids >= vocab_size)
  for a in allowed:
    bad &= ids != a
  if bad.any():
    raise InputError(f"input_ids: token id {int(ids[bad][0])} is outside the vocabulary "
                     f"[0, {vocab_size}) ({int(bad.sum())} such id(s))")


def check_finite(x, name: str) -> None:
  """Float inputs must hold no NaN or inf."""
  a = np.asarray(x)
  if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
    raise InputError(f"{name} holds {int((~np.isfinite(a)).sum())} NaN/inf value(s)")
