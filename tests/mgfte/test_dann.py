"""The joint cross-domain objective ("dann"): gradient reversal, ramp, variance floor, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmm import domain
from jaxmm.mgfte import adversarial
from jaxmm.mgfte import model as model_lib
from jaxmm.models import bert

BCFG = bert.Config(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                   max_position_embeddings=16)
MCFG = model_lib.Config()
B, N, K, Q, L, M = 1, 2, 2, 2, 10, 6
REPO = Path(__file__).resolve().parents[2]


def _inputs(seed=0):
  rng = np.random.default_rng(seed)

  def sents(shape):
    lengths = rng.integers(6, L + 1, shape)
    mask = (np.arange(L) < lengths[..., None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, BCFG.vocab_size, shape + (L,)), 0).astype(np.int32)
    tags = np.zeros(shape + (L,), np.int32)
    tags[..., 1], tags[..., 2], tags[..., 4] = 1, 2, 3
    return ids, mask, tags

  s_ids, s_mask, s_tags = sents((B, N, K))
  q_ids, q_mask, q_tags = sents((B, N * Q))
  batch = dict(s_ids=s_ids, s_mask=s_mask, s_tags=s_tags, q_ids=q_ids, q_mask=q_mask,
               q_tags=q_tags, q_rel=np.repeat(np.arange(N), Q)[None].astype(np.int32))
  t_ids, t_mask, _ = sents((M,))
  return batch, {"ids": t_ids, "mask": t_mask}


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"encoder": bert.init_params(BCFG, k1), "head": model_lib.init_head(MCFG, 16, k2),
          "disc": adversarial.init_discriminator(k3, 16)}


_GRAD = jax.jit(jax.grad(adversarial.joint_loss, has_aux=True), static_argnums=(1, 2, 7))


def _grads(lam, floor_weight=0.0, floor=None):
  batch, tgt = _inputs()
  floor = jnp.zeros(16) if floor is None else floor
  return _GRAD(_params(), BCFG, MCFG, batch, tgt, jnp.float32(lam), floor, floor_weight,
               jax.random.key(1))[0]


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_encoder_gets_minus_lambda_times_the_domain_gradient():
  """GRL: the encoder's gradient moves by -lam * dL_D/d(encoder) (read with lam = -1, where the
  reversal passes the plain gradient), the discriminator's does not depend on lam. (Jitted only:
  `grad_reverse` itself is checked without jit in tests/cadit/test_cadit_steps.py.)"""
  g0, g1, gm = _grads(0.0), _grads(0.3), _grads(-1.0)
  plain = _flat(gm["encoder"]) - _flat(g0["encoder"])      # dL_D / d(encoder)
  assert np.abs(plain).max() > 1e-6                          # the term reaches the encoder
  # differences of float32 gradients: their rounding is relative to the gradients' own size
  scale = np.abs(_flat(g0["encoder"])).max()
  np.testing.assert_allclose(_flat(g1["encoder"]) - _flat(g0["encoder"]), -0.3 * plain,
                             rtol=1e-3, atol=1e-5 * scale)
  np.testing.assert_allclose(_flat(g1["disc"]), _flat(g0["disc"]), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(_flat(g1["head"]), _flat(g0["head"]), rtol=1e-5, atol=1e-8)


def test_disc_lr_gives_the_discriminator_its_own_group():
  from jaxmm.mgfte import training
  params = {k: {"w": jnp.ones(3)} for k in ("encoder", "head", "disc")}
  grads = jax.tree.map(lambda x: 2.0 * x, params)
  # Adam's first step moves every coordinate by its group's lr (g / |g|), which reads the groups.
  for disc_lr, want in ((None, 1e-3), (1e-5, 1e-5)):
    tx = training.make_optimizer(enc_lr=1e-4, head_lr=1e-3, weight_decay=0.0, disc_lr=disc_lr)
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["disc"]["w"], -want, rtol=1e-4)
    np.testing.assert_allclose(upd["head"]["w"], -1e-3, rtol=1e-4)
    np.testing.assert_allclose(upd["encoder"]["w"], -1e-4, rtol=1e-4)


def test_disc_lr_without_dann_is_a_one_line_error(tmp_path, capsys):
  from jaxmm.cli import module_main
  rc = module_main("jaxmm.train.mgfte", ["--tiny", "--tokenizer", str(tmp_path), "--out",
                                         str(tmp_path / "run"), "--disc-lr", "1e-4"])
  err = capsys.readouterr().err
  assert rc == 2 and err.strip() == "error: --disc-lr applies to --adv-mode dann only", err
  assert not (tmp_path / "run").exists()


def test_variance_floor_is_a_hinge_on_each_dimensions_spread():
  same = jnp.ones((8, 4))
  np.testing.assert_allclose(adversarial.variance_floor(same, jnp.full(4, 0.5)), 0.5 - 1e-3,
                             rtol=1e-4)
  spread = jnp.asarray(np.random.default_rng(0).standard_normal((256, 4)), jnp.float32)
  assert float(adversarial.variance_floor(spread, jnp.full(4, 0.5))) == 0.0


def test_variance_floor_is_active_and_reaches_the_encoder():
  """With a floor above the features' spread the term is positive and moves the encoder's
  gradient; with weight 0 it changes nothing."""
  batch, tgt = _inputs()
  high = jnp.full(16, 10.0)
  loss = jax.jit(adversarial.joint_loss, static_argnums=(1, 2, 7))
  _, aux = loss(_params(), BCFG, MCFG, batch, tgt, jnp.float32(0.0), high, 1.0, jax.random.key(1))
  assert float(aux["var_loss"]) > 1.0
  g_on, g_off = _grads(0.0, 1.0, high), _grads(0.0, 0.0, high)
  assert np.abs(_flat(g_on["encoder"]) - _flat(g_off["encoder"])).max() > 1e-6
  np.testing.assert_allclose(_flat(_grads(0.0, 0.0, high)["encoder"]),
                             _flat(_grads(0.0, 0.0)["encoder"]), rtol=1e-6, atol=1e-9)


def test_feature_floor_is_half_the_initial_spread_of_mean_pooled_features():
  _, tgt = _inputs()
  enc = _params()["encoder"]
  got = adversarial.feature_floor(BCFG, MCFG, enc, tgt["ids"], tgt["mask"], chunk=4)
  f = model_lib.mean_pooled(model_lib.encode(BCFG, MCFG, enc, tgt["ids"], tgt["mask"]),
                            tgt["mask"])
  np.testing.assert_allclose(got, 0.5 * np.asarray(f).std(0), rtol=1e-5, atol=1e-7)
  h = np.asarray(model_lib.encode(BCFG, MCFG, enc, tgt["ids"], tgt["mask"]))
  want = np.stack([h[i, :tgt["mask"][i].sum()].mean(0) for i in range(M)])
  np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6)


def test_cli_trains_with_the_ramped_joint_term(tmp_path, shared_data, tokenizer_dir):
  shared_data("fewrel")
  out = tmp_path / "run"
  cmd = [sys.executable, "-m", "jaxmm.train.mgfte", "--tiny", "--tokenizer", str(tokenizer_dir),
         "--out", str(out), "--steps", "2", "--max-per-relation", "12", "--batch", "1",
         "--n", "2", "--k", "2", "--q", "2", "--val-n", "2", "--val-k", "2",
         "--val-episodes", "2", "--eval-every", "100", "--log-every", "1",
         "--adv-mode", "dann", "--adv-weight", "0.5"]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
  assert r.returncode == 0, r.stderr[-2000:]
  recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if "lam" in l]
  lams = [r["lam"] for r in recs]
  np.testing.assert_allclose(lams, [0.5 * float(domain.dann_lambda(s, 2, 10.0)) for s in (1, 2)],
                             rtol=1e-6)
  assert all(np.isfinite(r["disc_loss"]) and r["var_loss"] >= 0 for r in recs)
  assert (out / "final").is_dir()
