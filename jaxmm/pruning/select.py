"""Applying a pruning stage: score per example (vmapped), keep the top-k visual tokens, gather.

Keys and batch independence: `apply_stage` takes either one PRNG key for the batch, from which
row b uses fold_in(key, b), or per-example keys [B] (e.g. fold_in(seed, example_id)) used as
they are. Only `random` uses the key. Deterministic methods never depend on the batch; random
pruning depends only on the example's own key (and, by `random.visual_rank`, not on its padding
or slot layout), so with per-example keys an example gives the same result alone or in any
batch. With one key for the batch, the result depends on the example's row. `key=None` is
allowed for the deterministic methods.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm.errors import InputError
from jaxmm.inputs import positions_from_mask
from jaxmm.pruning import schedule as schedule_lib
from jaxmm.pruning.state import TokenState


def per_example_keys(key, batch: int):
  """Keys [B]: fold_in(key, row) from one key, or a batch of keys as is."""
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
  single = key.ndim == (0 if typed else 1)
  if single:
    return jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
  if key.shape[0] != batch:
    raise InputError(f"got {key.shape[0]} per-example keys for a batch of {batch}")
  return key


def _concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def visual_count(state: TokenState, n_visual: int | None = None) -> int:
  """The static number of visual tokens per example; checked against the mask when concrete."""
  n = n_visual if n_visual is not None else state.n_visual
  if _concrete(state.visual):
    counts = np.asarray(state.visual).sum(axis=1)
    if n is None:
      n = int(counts[0])
    if not np.all(counts == n):
      raise InputError(f"pruning needs {n} visual tokens in every example, got {counts.tolist()}")
  if n is None:
    raise InputError("the number of visual tokens is unknown under jit: pass n_visual, a resolved "
                     "stage, or a TokenState with n_visual set")
  return int(n)


def _kept_slots(visual_N, scores_N, n_out: int):
  """i32[n_out] ascending: every non-visual slot, then the best visual slots up to n_out.

  One sort on (visual, -score, slot): non-visual slots first whatever their scores, then
  visual slots by descending score, ties to the lower slot (-inf/NaN scores rank last).
  """
  low = jnp.finfo(jnp.float32).min
  s = jnp.nan_to_num(scores_N.astype(jnp.float32), nan=low, neginf=low)
  slot = jnp.arange(visual_N.shape[0], dtype=jnp.int32)
  _, _, order = jax.lax.sort((visual_N.astype(jnp.int32), -s, slot), num_keys=3)
  return jnp.sort(order[:n_out])


def _gather(a_BxN, idx_BxM):
  idx = idx_BxM.reshape(idx_BxM.shape + (1,) * (a_BxN.ndim - 2))
  return jnp.take_along_axis(a_BxN, idx, axis=1)


def prune(state: TokenState, scores_BxN, k: int, positions: str,
          n_visual: int | None = None) -> TokenState:
  """Keeps all non-visual slots (text and padding) and the top-k visual slots of each example,
  in their original order. Output length N - n_visual + k (static).

  positions: "preserve" gathers the position ids; "compact" renumbers them as the number of
  valid tokens before each slot (0 on padding), as `jaxmm.inputs.positions_from_mask`.
  n_visual: visual tokens per example entering (default: state.n_visual, or counted if concrete).
  """
  n_in = visual_count(state, n_visual)
  if not 0 <= k <= n_in:
    raise InputError(f"cannot keep {k} of {n_in} visual tokens")
  schedule_lib._check_positions(positions)
  n_out = state.valid.shape[1] - n_in + k
  idx = jax.vmap(functools.partial(_kept_slots, n_out=n_out))(state.visual, scores_BxN)
  valid = _gather(state.valid, idx)
  pos = _gather(state.positions, idx) if positions == "preserve" else positions_from_mask(valid)
  return TokenState(hidden=_gather(state.hidden, idx), positions=pos.astype(jnp.int32),
                    valid=valid, visual=_gather(state.visual, idx),
                    origin=_gather(state.origin, idx), n_visual=k)


def scores(stage, state: TokenState, aux: dict, key):
  """f32[B, N]: the stage's method scores, vmapped over examples with per-example keys."""
  method = schedule_lib.METHODS[stage.method]
  if key is None:   # only random pruning draws from the key
    if stage.method == "random":
      raise InputError(f"stage {stage} needs a PRNG key")
    key = jax.random.key(0)
  keys = per_example_keys(key, state.valid.shape[0])
  aux = {name: aux[name] for name in method.NEEDS}
  score = functools.partial(method.score, k=stage.keep)
  return jax.vmap(lambda s, a, kk: score(s, a, kk))(state, aux, keys)


def apply_stage(stage, state: TokenState, aux: dict, key) -> TokenState:
  """Scores and prunes one resolved stage. aux: the method's NEEDS from layer K-1, batched
  ("queries" f[B, N, H, d_h], "attn_row" f32[B, S >= N]). key: see the module docstring."""
  if not isinstance(stage.keep, int):
    raise InputError(f"stage {stage} is not resolved: call schedule.resolve first")
  missing = schedule_lib.METHODS[stage.method].NEEDS - set(aux)
  if missing:
    raise InputError(f"stage {stage} needs {sorted(missing)} from layer {stage.layer - 1}")
  return prune(state, scores(stage, state, aux, key), stage.keep, stage.positions,
               stage.visual_in)


def kept_indices(state: TokenState):
  """i32[B, n_visual]: original indices (origin) of the visual tokens present, ascending."""
  n = visual_count(state)
  idx = jax.vmap(lambda m: jnp.flatnonzero(m, size=n))(state.visual)
  return jnp.take_along_axis(state.origin, idx, axis=1)
