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
  """The static visual capacity per example: `n_visual`, else `state.n_visual`, else (concrete
  states only) the count, which must then be the same in every example. With a capacity given,
  examples may hold fewer visual tokens (padded capacity), never more."""
  n = n_visual if n_visual is not None else state.n_visual
  if _concrete(state.visual):
    counts = np.asarray(state.visual).sum(axis=1)
    if n is None:
      n = int(counts[0])
      if not np.all(counts == n):
        raise InputError(f"pruning needs {n} visual tokens in every example, got "
                         f"{counts.tolist()} (give the capacity to prune a ragged batch)")
    elif counts.max(initial=0) > n:
      raise InputError(f"an example holds {int(counts.max())} visual tokens, over the capacity {n}")
  if n is None:
    raise InputError("the number of visual tokens is unknown under jit: pass n_visual, a resolved "
                     "stage, or a TokenState with n_visual set")
  return int(n)


def keep_table(keep, capacity: int) -> np.ndarray:
  """i32[capacity + 1]: the visual tokens an example with n of them keeps, for n = 0..capacity.

  A count keeps min(keep, n); a percentage applies to the example's own n (rounded half up, as
  `schedule.keep_count`). A host table, so the rounding is exactly the host's."""
  return np.asarray([schedule_lib.keep_count(keep, n) if isinstance(keep, str) else min(keep, n)
                     for n in range(capacity + 1)], np.int32)


def _kept_slots(visual_N, scores_N, k_vis, n_out: int):
  """(i32[n_out] slots, bool[n_out] real): every non-visual slot (text, padding) and the k_vis
  best visual slots (ties to the lower slot; -inf/NaN scores rank last), in slot order, after
  n_out - (N - n + k_vis) filler slots (real False) that pad an example which keeps fewer
  slots than the batch's longest, as extra left padding."""
  low = jnp.finfo(jnp.float32).min
  s = jnp.nan_to_num(scores_N.astype(jnp.float32), nan=low, neginf=low)
  n = visual_N.shape[0]
  slot = jnp.arange(n, dtype=jnp.int32)
  _, _, by_score = jax.lax.sort(((~visual_N).astype(jnp.int32), -s, slot), num_keys=3)
  rank = jnp.zeros_like(slot).at[by_score].set(slot)
  dropped = visual_N & (rank >= k_vis)
  _, order = jax.lax.sort((dropped.astype(jnp.int32), slot), num_keys=2)
  src = jnp.arange(n_out) - (n_out - (n - dropped.sum()))
  return jnp.where(src >= 0, order[jnp.clip(src, 0, n - 1)], 0), src >= 0


def _gather(a_BxN, idx_BxM):
  idx = idx_BxM.reshape(idx_BxM.shape + (1,) * (a_BxN.ndim - 2))
  return jnp.take_along_axis(a_BxN, idx, axis=1)


def _out_len(state: TokenState, k_B, n_out: int | None, n_in: int, k: int) -> int:
  """The static pruned length: `n_out` (resolved from the host's counts), else N - n_in + k,
  which fits every example of a batch with one visual count (checked when concrete)."""
  if n_out is None:
    n_out = state.valid.shape[1] - n_in + k
  if _concrete(state.visual) and _concrete(k_B):
    need = state.valid.shape[1] - np.asarray(state.visual).sum(1) + np.asarray(k_B)
    if need.max(initial=0) > n_out:
      raise InputError(f"a pruned example needs {int(need.max())} slots, over the {n_out} "
                       "resolved: resolve the schedule with the batch's counts")
  return n_out


def prune(state: TokenState, scores_BxN, k: int, positions: str,
          n_visual: int | None = None, *, keep=None, n_out: int | None = None) -> TokenState:
  """Keeps all non-visual slots (text, padding) and each example's top visual slots, in their
  original order. An example that keeps fewer slots than the static length gets filler slots
  in front (valid and visual False, origin -1), like extra left padding.

  k: the static keep at the capacity (the most any example keeps). keep: the stage's keep, a
  count (each example keeps min(keep, n_b)) or a percentage of its own n_b; default k.
  positions: "preserve" gathers the position ids; "compact" renumbers them as the number of
  valid tokens before each slot (0 on padding), as `jaxmm.inputs.positions_from_mask`.
  n_visual: the visual capacity entering (default: state.n_visual, or counted if concrete).
  n_out: the static output length (`Stage.out_len`); default N - n_visual + k.
  """
  n_in = visual_count(state, n_visual)
  if not 0 <= k <= n_in:
    raise InputError(f"cannot keep {k} of {n_in} visual tokens")
  schedule_lib._check_positions(positions)
  if positions == "compact" and state.positions.ndim > 2:
    raise InputError("positions 'compact' is not defined for multi-axis (M-RoPE) positions; "
                     "use 'preserve'")
  table = jnp.asarray(keep_table(k if keep is None else keep, n_in))
  k_B = table[jnp.minimum((state.visual & state.valid).sum(axis=1), n_in)]
  n_out = _out_len(state, k_B, n_out, n_in, k)
  idx, real = jax.vmap(functools.partial(_kept_slots, n_out=n_out))(
      state.visual, scores_BxN, k_B)
  valid = _gather(state.valid, idx) & real
  pos = _gather(state.positions, idx) if positions == "preserve" else positions_from_mask(valid)
  return TokenState(hidden=_gather(state.hidden, idx), positions=pos.astype(jnp.int32),
                    valid=valid, visual=_gather(state.visual, idx) & real,
                    origin=jnp.where(real, _gather(state.origin, idx), -1), n_visual=k)


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
               stage.visual_in, keep=stage.percent or stage.keep, n_out=stage.out_len)


def kept_indices(state: TokenState):
  """i32[B, n_visual]: original indices (origin) of the visual tokens present, ascending, padded
  with -1 where an example holds fewer than the capacity."""
  n = visual_count(state)
  idx = jax.vmap(lambda m: jnp.flatnonzero(m, size=n, fill_value=-1))(state.visual)
  return jnp.where(idx >= 0, jnp.take_along_axis(state.origin, jnp.maximum(idx, 0), axis=1), -1)
