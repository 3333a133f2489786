"""Selection and gather: property tests over layouts, budgets, scores and batch composition."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prune_layouts import Example, aux_for, batch
from jaxmm.errors import InputError
from jaxmm.inputs import positions_from_mask
from jaxmm.pruning import schedule, select

NV, T_BATCH, T_ALONE = 8, 24, 20   # prefix <= 6 and suffix <= 6 keep every example within 20
prune_jit = jax.jit(select.prune, static_argnums=(2, 3, 4))
apply_jit = jax.jit(select.apply_stage, static_argnums=0)

examples = st.builds(Example, seed=st.integers(0, 2**31 - 1), prefix=st.integers(0, 6),
                     n_visual=st.just(NV), suffix=st.integers(1, 6))


def reference_slots(visual_N, scores_N, k):
  """Kept slots, plain NumPy: non-visual ones and the k best visual (ties -> lower slot)."""
  vis = [i for i in np.flatnonzero(visual_N)]
  best = sorted(vis, key=lambda i: (-scores_N[i], i))[:k]
  return np.sort(np.concatenate([np.flatnonzero(~visual_N), best]).astype(int))


def check_pruned(before, after, k, positions):
  """The contract every stage output satisfies, example by example."""
  vis_b, orig_b = np.asarray(before.visual), np.asarray(before.origin)
  assert after.n_visual == k
  for b in range(vis_b.shape[0]):
    o = np.asarray(after.origin[b])
    assert np.all(np.diff(o) > 0)                                    # original order
    assert int(np.asarray(after.visual[b]).sum()) == k               # exactly k visual kept
    assert set(orig_b[b][~vis_b[b]]) <= set(o)                       # no text/padding dropped
    src = np.searchsorted(orig_b[b], o)
    np.testing.assert_array_equal(np.asarray(after.hidden[b]), np.asarray(before.hidden[b])[src])
    np.testing.assert_array_equal(np.asarray(after.valid[b]), np.asarray(before.valid[b])[src])
    want_pos = (np.asarray(before.positions[b])[src] if positions == "preserve" else
                np.asarray(positions_from_mask(after.valid[b][None]))[0])
    np.testing.assert_array_equal(np.asarray(after.positions[b]), want_pos)
  kept = np.asarray(select.kept_indices(after))
  np.testing.assert_array_equal(kept, np.asarray(after.origin)[np.asarray(after.visual)].reshape(len(kept), k))


@settings(max_examples=25, deadline=None)
@given(exs=st.lists(examples, min_size=3, max_size=3), k=st.sampled_from([0, 3, NV]),
       positions=st.sampled_from(["preserve", "compact"]), seed=st.integers(0, 2**31 - 1))
def test_prune_keeps_top_k_visual_and_all_text(exs, k, positions, seed):
  state, _ = batch(exs, T_BATCH)
  rng = np.random.default_rng(seed)
  # Small integers: many ties. Text and padding get huge or -inf scores, which must not matter.
  scores = rng.integers(0, 4, (3, T_BATCH)).astype(np.float32)
  scores[~np.asarray(state.visual)] = rng.choice([1e30, -np.inf, np.nan], (~np.asarray(state.visual)).sum())
  out = prune_jit(state, jnp.asarray(scores), k, positions, NV)
  check_pruned(state, out, k, positions)
  for b in range(3):
    np.testing.assert_array_equal(np.asarray(out.origin[b]),
                                  reference_slots(np.asarray(state.visual[b]), scores[b], k))


def test_prune_counts_visual_tokens_when_concrete_and_rejects_mismatch():
  state, _ = batch([Example(0, 2, NV, 3), Example(1, 0, NV, 1)])
  out = select.prune(state, jnp.zeros(state.valid.shape), 3, "preserve")
  assert out.n_visual == 3 and out.valid.shape[1] == state.valid.shape[1] - NV + 3
  bad, _ = batch([Example(0, 2, NV, 3), Example(1, 0, NV - 1, 2)])
  with pytest.raises(InputError, match=r"\[8, 7\]"):
    select.prune(bad, jnp.zeros(bad.valid.shape), 3, "preserve")
  with pytest.raises(InputError, match="cannot keep 9 of 8"):
    select.prune(state, jnp.zeros(state.valid.shape), 9, "preserve")


def test_prune_under_jit_needs_a_static_visual_count():
  state, _ = batch([Example(0, 2, NV, 3)])
  with pytest.raises(InputError, match="unknown under jit"):
    jax.jit(lambda s: select.prune(s, jnp.zeros(s.valid.shape), 3, "preserve"))(state)


def test_apply_stage_rejects_unresolved_stage_and_missing_aux():
  state, aux = batch([Example(0, 2, NV, 3)])
  with pytest.raises(InputError, match="not resolved"):
    select.apply_stage(schedule.parse("fastv@2:50%")[0], state, aux, jax.random.key(0))
  (stage,) = schedule.resolve(schedule.parse("entropy@2:3"), NV, 4)
  with pytest.raises(InputError, match="queries"):
    select.apply_stage(stage, state, {"attn_row": aux["attn_row"]}, jax.random.key(0))


def _rows(state, b):
  """(hidden, positions, visual, origin relative to the first valid slot) of example b's valid slots."""
  v = np.asarray(state.valid[b])
  o = np.asarray(state.origin[b])
  return (np.asarray(state.hidden[b])[v], np.asarray(state.positions[b])[v],
          np.asarray(state.visual[b])[v], o[v] - o[v][0])


@pytest.mark.parametrize("method", ["entropy", "random", "divprune", "fastv"])
@settings(max_examples=6, deadline=None)
@given(exs=st.lists(examples, min_size=3, max_size=3), which=st.integers(0, 2))
def test_batch_composition_does_not_matter(method, exs, which):
  """An example pruned alone (its own padding) equals the same example inside a batch."""
  (stage,) = schedule.resolve(schedule.parse(f"{method}@{0 if method in ('random', 'divprune') else 2}:3"), NV, 4)
  base = jax.random.key(7)
  keys = jnp.stack([jax.random.fold_in(base, e.seed) for e in exs])   # per-example keys
  state, aux = batch(exs, T_BATCH, extra_slots=2)
  out = apply_jit(stage, state, aux, keys)
  check_pruned(state, out, 3, stage.positions)
  alone_state, alone_aux = batch([exs[which]], T_ALONE, extra_slots=2)
  alone = apply_jit(stage, alone_state, alone_aux, keys[which][None])
  for got, want in zip(_rows(out, which), _rows(alone, 0)):
    np.testing.assert_array_equal(got, want)


def test_one_key_means_fold_in_of_the_row():
  key = jax.random.key(3)
  want = jax.random.key_data(jnp.stack([jax.random.fold_in(key, b) for b in range(3)]))
  np.testing.assert_array_equal(jax.random.key_data(select.per_example_keys(key, 3)), want)
  raw = jax.random.PRNGKey(3)   # raw uint32[2] keys follow the same rule
  np.testing.assert_array_equal(select.per_example_keys(raw, 3),
                                jnp.stack([jax.random.fold_in(raw, b) for b in range(3)]))
  rows = jax.random.split(key, 3)   # per-example keys are used as they are
  assert select.per_example_keys(rows, 3) is rows
  with pytest.raises(InputError, match="2 per-example keys for a batch of 3"):
    select.per_example_keys(rows[:2], 3)


@pytest.mark.parametrize("text, counts", [("divprune@0:6,random@3:2", [6, 2]),
                                          ("entropy@1:6,fastv@3:50%", [6, 3])])
def test_multi_stage_schedule(text, counts):
  exs = [Example(11, 2, NV, 3), Example(12, 0, NV, 1), Example(13, 5, NV, 6)]
  state, full_aux = batch(exs, T_BATCH)
  kept = []
  for stage in schedule.resolve(schedule.parse(text), NV, 4):
    out = apply_jit(stage, state, aux_for(state, full_aux), jax.random.key(0))
    check_pruned(state, out, stage.keep, stage.positions)
    kept.append(np.asarray(select.kept_indices(out)))
    state = out
  assert [k.shape[1] for k in kept] == counts
  for b in range(3):
    assert set(kept[1][b]) <= set(kept[0][b])
