"""FastV scoring from a given attention row (the row itself is tested with the model)."""
import jax
import jax.numpy as jnp
import numpy as np

from prune_layouts import Example, batch
from jaxmm.pruning import fastv, schedule, select


def test_keeps_the_most_attended_visual_tokens():
  exs = [Example(3, 2, 8, 3), Example(4, 0, 8, 1)]
  state, aux = batch(exs, extra_slots=4)
  row = np.asarray(aux["attn_row"]).copy()
  n = state.valid.shape[1]
  row[:, n:] = 10.0                                   # decode slots beyond N must be ignored
  row[:, :n][~np.asarray(state.visual)] += 1.0        # text attention is high: irrelevant too
  (stage,) = schedule.resolve(schedule.parse("fastv@2:50%"), 8, 4)
  out = jax.jit(select.apply_stage, static_argnums=0)(stage, state, {"attn_row": jnp.asarray(row)}, jax.random.key(0))
  for b in range(2):
    vis = np.flatnonzero(np.asarray(state.visual[b]))
    want = np.sort(vis[np.argsort(-row[b, :n][vis], kind="stable")[:4]])
    np.testing.assert_array_equal(np.asarray(select.kept_indices(out))[b], want)
  s = fastv.score(jax.tree.map(lambda a: a[0], state), {"attn_row": jnp.asarray(row[0])}, None, 4)
  assert s.shape == (n,)
  np.testing.assert_array_equal(np.isneginf(np.asarray(s)), ~np.asarray(state.visual[0]))
  np.testing.assert_array_equal(np.asarray(s)[np.asarray(state.visual[0])],
                                row[0, :n][np.asarray(state.visual[0])])
