"""Networks' contracts, gradient reversal, and the alternating steps' parameter groups."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm import domain
from jaxmm.cadit import config, losses, networks, objectives, steps

CFG = config.tiny()


def _batch(cfg, seed=0):
  r = np.random.default_rng(seed)
  shape = (cfg.batch, cfg.image_size, cfg.image_size, cfg.channels)
  return {"xs": jnp.asarray(r.uniform(-1, 1, shape), jnp.float32),
          "ys": jnp.asarray(r.integers(0, cfg.num_classes, cfg.batch), jnp.int32),
          "xt": jnp.asarray(r.uniform(-1, 1, shape), jnp.float32)}


@pytest.fixture(scope="module")
def runner():
  return steps.get(CFG, fast_compile=True)


def _changed(before, after) -> set:
  return {role for role in before
          if any(not np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(before[role]), jax.tree.leaves(after[role])))}


def test_grad_reverse_flips_and_scales_gradients():
  x = jnp.array([1.0, -2.0, 3.0])
  w = jnp.array([0.5, 4.0, -1.0])
  np.testing.assert_array_equal(domain.grad_reverse(x, 0.7), x)
  g = jax.grad(lambda x: (domain.grad_reverse(x, 0.7) * w).sum())(x)
  np.testing.assert_allclose(g, -0.7 * w, rtol=1e-6)
  g_plain = jax.grad(lambda x: (x * w).sum())(x)
  np.testing.assert_allclose(g, -0.7 * g_plain, rtol=1e-6)


def test_network_shapes():
  """Shapes by abstract evaluation (no compile): G keeps the image shape, D gives one logit
  (2K for joint2k), LeNet gives K logits and F features."""
  b = _batch(CFG)
  y = jax.nn.one_hot(b["ys"], CFG.num_classes)
  for mode, d_shape in (("concat", (CFG.batch,)), ("projection", (CFG.batch,)),
                        ("joint2k", (CFG.batch, 2 * CFG.num_classes))):
    cfg = dataclasses.replace(CFG, d_mode=mode)
    nets = networks.build(cfg)
    p = jax.eval_shape(lambda k: networks.init_params(cfg, k), jax.random.key(0, impl="rbg"))
    assert jax.eval_shape(lambda p: nets.g_st.apply({"params": p}, b["xs"]), p["g_st"]).shape \
        == b["xs"].shape
    assert jax.eval_shape(lambda p: nets.d_t.apply({"params": p}, b["xs"], y), p["d_t"]).shape \
        == d_shape
  logits, feat = jax.eval_shape(lambda p: nets.c_t.apply({"params": p}, b["xs"]), p["c_t"])
  assert logits.shape == (CFG.batch, CFG.num_classes) and feat.shape == (CFG.batch, 16)
  maps = networks.label_maps(b["xs"][:2], y[:2])
  np.testing.assert_array_equal(maps[:, 3, 5, 1:], y[:2])


def test_pretrain_updates_only_source_classifier_and_hands_it_over(runner):
  state = steps.init_state(CFG, 0)
  b = _batch(CFG)
  new, _ = runner.pretrain(state, b)
  assert _changed(state["params"], new["params"]) == {"c_s"}
  for i in range(1, CFG.pretrain_steps):
    new, _ = runner.pretrain(new, b)
  assert int(new["step"]) == CFG.pretrain_steps
  assert not _changed({"c": new["params"]["c_s"]}, {"c": new["params"]["c_t"]})


def test_alternating_steps_update_only_their_groups(runner):
  state = steps.init_state(CFG, 0)
  state = {**state, "step": jnp.asarray(CFG.pretrain_steps + 2, jnp.int32)}
  b = _batch(CFG)
  s_d, tr, m_d = runner.d_step(state, b)
  assert _changed(state["params"], s_d["params"]) == {"d_t", "d_s"}
  s_g, m_g = runner.g_step(s_d, b, tr)
  assert _changed(s_d["params"], s_g["params"]) == {"g_st", "g_ts"}
  s_c, m_c = runner.c_step(s_g, b, tr)
  assert _changed(s_g["params"], s_c["params"]) == {"c_s", "c_t"}  # dom: zero grads, no move
  assert int(s_c["step"]) == int(state["step"]) + 1
  for m in (m_d, m_g, m_c):
    assert all(np.isfinite(float(v)) for v in m.values())
  # the optimiser states of other groups are untouched, too
  assert not _changed({"o": state["opt"]["c"]}, {"o": s_g["opt"]["c"]})


def test_dann_and_source_only_steps_train_the_target_classifier(runner):
  state = steps.init_state(CFG, 0)
  state = {**state, "step": jnp.asarray(CFG.pretrain_steps, jnp.int32)}
  b = _batch(CFG)
  s_src, _ = runner.source_step(state, b)
  assert _changed(state["params"], s_src["params"]) == {"c_t"}
  s_dann, m = runner.dann_step({**state, "step": state["step"] + 3}, b)
  assert _changed(state["params"], s_dann["params"]) == {"c_t", "dom"}
  assert np.isfinite(float(m["dom"]))


def test_unidirectional_keeps_the_source_classifier_frozen():
  cfg = dataclasses.replace(CFG, bidirectional=False)
  run = steps.get(cfg, fast_compile=True)
  state = {**steps.init_state(cfg, 0), "step": jnp.asarray(cfg.pretrain_steps, jnp.int32)}
  state, _ = run.cadit_step(state, _batch(cfg))
  after = state["params"]
  before = steps.init_state(cfg, 0)["params"]
  assert _changed(before, after) == {"d_t", "g_st", "c_t"}


def test_residual_translator_starts_as_the_identity():
  cfg = dataclasses.replace(config.tiny(), gen_skip=3.0)
  params = networks.init_params(cfg, jax.random.key(0))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 1)).astype(np.float32)
  y = networks.build(cfg).g_st.apply({"params": params["g_st"]}, x)
  np.testing.assert_allclose(y, np.tanh(3.0 * x), atol=1e-6)



def test_feature_term_reverses_into_the_classifier_and_trains_the_domain_head():
  """lam_feat adds the domain loss of the DANN head on C_t features (translated source = 1,
  real target = 0): the head descends it, C_t gets its gradient reversed and scaled by
  lam = lam_feat * dann_lambda(t); nothing else changes."""
  # In float64: `extra` is a difference of two whole gradients, and in float32 its rounding
  # (about 1e-5 of the gradients' scale) is larger than the tolerance on small entries.
  with jax.enable_x64(True):
    _check_feature_term()


def _check_feature_term():
  cfg = dataclasses.replace(CFG, lam_feat=0.5)
  nets = networks.build(cfg)
  f64 = lambda tree: jax.tree.map(
      lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
  params = f64(networks.init_params(cfg, jax.random.key(0, impl="rbg")))
  batch = f64(_batch(cfg))
  tr = objectives.translations(cfg, nets, params, batch["xs"], batch["xt"])
  t, rng = cfg.steps // 2, jax.random.key(1, impl="rbg")
  grad = lambda c: jax.grad(lambda p: objectives.c_loss(c, nets, p, batch, tr, t, rng)[0])(params)
  extra = jax.tree.map(lambda a, b: a - b, grad(cfg), grad(CFG))

  def domain_loss(p):  # the same term without reversal, with c_loss's dropout key for C_t
    k_t, _ = jax.random.split(rng)
    x = jnp.concatenate([batch["xt"], tr["fake_t"]])
    dom = nets.dom.apply({"params": p["dom"]}, objectives.classify(nets, p, "c_t", x, k_t)[1])
    return losses.domain_loss(dom[cfg.batch:], dom[:cfg.batch])

  want = jax.grad(domain_loss)(params)
  assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves([extra, want]))
  lam = 0.5 * float(domain.dann_lambda(t, cfg.steps, cfg.dann_gamma))
  assert lam > 0.1 and np.abs(jax.tree.leaves(want["c_t"])[0]).max() > 0
  for role, scale in (("dom", 1.0), ("c_t", -lam)):
    for a, b in zip(jax.tree.leaves(extra[role]), jax.tree.leaves(want[role])):
      np.testing.assert_allclose(a, scale * b, rtol=1e-4, atol=1e-7, err_msg=role)
  for role in ("c_s", "g_st", "g_ts", "d_t", "d_s"):
    assert not any(np.abs(a).max() for a in jax.tree.leaves(extra[role])), role
