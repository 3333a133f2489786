"""MG-FTE and baseline forward/loss on a tiny random encoder (mgfte.md §3-4)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from jaxmm.mgfte import adversarial, training
from jaxmm.mgfte import model as model_lib
from jaxmm.models import bert

BCFG = bert.Config(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24,
                   max_position_embeddings=16)
B, N, K, Q, L = 2, 2, 2, 2, 10


def _sentences(rng, shape, lengths=None):
  """ids/mask/tags with a prefix mask (>= 6 tokens) and a head (B I) and tail (B) span."""
  lengths = rng.integers(6, L + 1, shape) if lengths is None else np.broadcast_to(lengths, shape)
  mask = (np.arange(L) < lengths[..., None]).astype(np.int32)
  ids = np.where(mask == 1, rng.integers(1, BCFG.vocab_size, shape + (L,)), 0).astype(np.int32)
  tags = np.zeros(shape + (L,), np.int32)
  tags[..., 1], tags[..., 2], tags[..., 4] = 1, 2, 3
  return ids, mask, tags


def make_batch(seed=0, q_lengths=None, s_lengths=None):
  rng = np.random.default_rng(seed)
  s_ids, s_mask, s_tags = _sentences(rng, (B, N, K), s_lengths)
  q_ids, q_mask, q_tags = _sentences(rng, (B, N * Q), q_lengths)
  q_rel = np.repeat(np.arange(N), Q)[None].repeat(B, 0).astype(np.int32)
  return dict(s_ids=s_ids, s_mask=s_mask, s_tags=s_tags, q_ids=q_ids, q_mask=q_mask,
              q_tags=q_tags, q_rel=q_rel)


scores = jax.jit(model_lib.scores, static_argnums=(0, 1), static_argnames="gold_relation")


def make_params(cfg, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"encoder": bert.init_params(BCFG, k1), "head": model_lib.init_head(cfg, 16, k2)}


def test_tag_prototypes_are_masked_means_with_zeros_for_absent_tags():
  rng = np.random.default_rng(0)
  h = rng.normal(size=(1, 1, 2, 5, 3)).astype(np.float32)
  tags = np.array([[[[0, 1, 2, 2, 0], [0, 3, 0, 0, 2]]]])
  mask = np.array([[[[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]]])
  got = np.asarray(model_lib.tag_prototypes(h, tags, mask, 5))[0, 0]
  s0, s1 = h[0, 0, 0], h[0, 0, 1]
  want = np.zeros((5, 3))
  want[0] = (s0[0] + s1[[0, 2, 3]].mean(0)) / 2            # s0's position 4 is padding
  want[1] = (s0[1] + 0) / 2
  want[2] = (s0[[2, 3]].mean(0) + s1[4]) / 2
  want[3] = (0 + s1[1]) / 2
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_reference_pooling_equals_truncating_the_batch_to_its_longest_query():
  cfg = model_lib.Config(pool_mode="reference")
  params = make_params(cfg)
  batch = make_batch(1, q_lengths=[6, 7, 6, 6], s_lengths=[7, 6])
  full, _ = scores(BCFG, cfg, params, batch, gold_relation=True)
  cut = {k: (v[..., :7] if k != "q_rel" else v) for k, v in batch.items()}
  short, _ = scores(BCFG, cfg, params, cut, gold_relation=True)
  np.testing.assert_allclose(full, short, rtol=1e-5, atol=1e-5)


def test_masked_pooling_ignores_other_queries_lengths():
  lengths = np.full((B, N * Q), 6)
  longer = lengths.copy()
  longer[1, 3] = 10          # one long query elsewhere in the batch
  results = {}
  for mode in ("masked", "reference"):
    cfg = model_lib.Config(pool_mode=mode)
    params = make_params(cfg)
    a, _ = scores(BCFG, cfg, params, make_batch(2, q_lengths=lengths), gold_relation=True)
    b, _ = scores(BCFG, cfg, params, make_batch(2, q_lengths=longer), gold_relation=True)
    results[mode] = np.abs(np.asarray(a)[0] - np.asarray(b)[0]).max()   # episode 0 untouched
  assert results["masked"] < 1e-5
  assert results["reference"] > 1e-4    # padded relu(bp) rows shift the max/sum


@jax.jit
def _decoder_parts(params, batch, c):
  cfg = model_lib.Config()
  enc = lambda ids, mask: model_lib.encode(BCFG, cfg, params["encoder"], ids.reshape(-1, L),
                                           mask.reshape(-1, L))
  hq = enc(batch["q_ids"], batch["q_mask"]).reshape(B, N * Q, L, -1)
  hs = enc(batch["s_ids"], batch["s_mask"]).reshape(B, N, K, L, -1)
  p = model_lib.tag_prototypes(hs, batch["s_tags"], batch["s_mask"], 5)
  s_hat, q_hat = model_lib.co_attention(params["head"], p, hq, batch["q_mask"])
  return model_lib.entity_emissions(s_hat, q_hat, p, hq, c), s_hat, q_hat, p, hq


def test_entity_decoder_uses_the_chosen_class():
  params = make_params(model_lib.Config())
  c = np.random.default_rng(0).integers(0, N, (B, N * Q))
  em, s_hat, q_hat, p, hq = map(np.asarray, _decoder_parts(params, make_batch(3), c))
  for b, q in ((1, 2), (0, 3)):
    proto = np.concatenate([s_hat[b, q, c[b, q]], p[b, c[b, q]]], -1)              # [T, 2D]
    tok = np.concatenate([q_hat[b, q, c[b, q]], hq[b, q]], -1)                      # [L, 2D]
    want = -np.linalg.norm(tok[:, None] - proto[None], axis=-1)
    np.testing.assert_allclose(em[b, q], want, rtol=1e-4, atol=1e-5)


def test_baseline_is_nearest_class_mean_and_tag_prototypes():
  cfg = model_lib.Config(variant="baseline")
  params = make_params(cfg)
  batch = make_batch(7)
  logits, em = map(np.asarray, scores(BCFG, cfg, params, batch, gold_relation=False))
  enc = jax.jit(lambda ids, mask: model_lib.encode(BCFG, cfg, params["encoder"], ids, mask))
  hs = np.asarray(enc(batch["s_ids"].reshape(-1, L), batch["s_mask"].reshape(-1, L)))
  hq = np.asarray(enc(batch["q_ids"].reshape(-1, L), batch["q_mask"].reshape(-1, L)))
  mean = lambda h, m: h.sum(1) / m.sum(1, keepdims=True)
  cls = mean(hs, batch["s_mask"].reshape(-1, L)).reshape(B, N, K, -1).mean(2)
  qv = mean(hq, batch["q_mask"].reshape(-1, L)).reshape(B, N * Q, -1)
  np.testing.assert_allclose(logits, -((qv[:, :, None] - cls[:, None]) ** 2).sum(-1), rtol=1e-4,
                             atol=1e-5)
  protos = np.asarray(model_lib.tag_prototypes(hs.reshape(B, N, K, L, -1), batch["s_tags"],
                                               batch["s_mask"], 5)).mean(1)         # [B, T, D]
  dist = np.linalg.norm(hq.reshape(B, N * Q, L, 1, -1) - protos[:, None, None], axis=-1)
  np.testing.assert_allclose(em, -dist, rtol=1e-4, atol=1e-5)


def test_training_overfits_one_batch():
  cfg = model_lib.Config()
  params = make_params(cfg)
  tx = training.make_optimizer(enc_lr=1e-3, head_lr=1e-2)
  step = training.make_train_step(BCFG, cfg, tx)
  batch = {k: jnp.asarray(v) for k, v in make_batch(4).items()}
  opt_state = tx.init(params)
  losses = []
  for i in range(25):
    params, opt_state, m = step(params, opt_state, batch, jax.random.key(i, impl="rbg"))
    losses.append(float(m["loss"]))
  assert all(np.isfinite(losses))
  assert losses[-1] < 0.5 * losses[0]
  rel, tags = jax.jit(model_lib.predict, static_argnums=(1, 2))(params, BCFG, cfg, batch)
  assert rel.shape == (B, N * Q) and tags.shape == (B, N * Q, L)
  assert (np.asarray(tags)[np.asarray(batch["q_mask"]) == 0] == 0).all()


def test_optimizer_is_pytorch_adam_with_coupled_l2():
  rng = np.random.default_rng(0)
  init = {"encoder": rng.normal(size=3).astype(np.float32), "head": rng.normal(size=2).astype(np.float32)}
  target = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in init.items()}
  tw = {k: torch.tensor(v, requires_grad=True) for k, v in init.items()}
  opt = torch.optim.Adam([{"params": [tw["encoder"]], "lr": 1e-2},
                          {"params": [tw["head"]], "lr": 1e-1}], weight_decay=0.5)
  tx = training.make_optimizer(enc_lr=1e-2, head_lr=1e-1, weight_decay=0.5)
  params = {k: jnp.asarray(v) for k, v in init.items()}
  state = tx.init(params)
  loss = lambda p: sum(((p[k] - target[k]) ** 3).sum() for k in p)
  for _ in range(4):
    opt.zero_grad()
    sum(((tw[k] - torch.tensor(target[k])) ** 3).sum() for k in tw).backward()
    opt.step()
    upd, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, upd)
  for k in init:
    np.testing.assert_allclose(params[k], tw[k].detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["inverted", "reference"])
def test_adversarial_term_reaches_the_encoder_except_in_reference_mode(mode):
  cfg = model_lib.Config()
  params = make_params(cfg)
  enc_tx, disc_tx = adversarial.encoder_optimizer(1e-3), adversarial.discriminator_optimizer()
  adv = adversarial.init_state(jax.random.key(5), params, BCFG.hidden_size, enc_tx, disc_tx)
  step = adversarial.make_step(BCFG, mode, enc_tx, disc_tx)
  src, tgt = make_batch(5), make_batch(6)
  new, new_adv, m = step(params, adv, src["s_ids"].reshape(-1, L), src["s_mask"].reshape(-1, L),
                         tgt["q_ids"].reshape(-1, L), tgt["q_mask"].reshape(-1, L),
                         jax.random.key(0, impl="rbg"))
  diff = lambda a, b: max(float(jnp.abs(x - y).max()) for x, y in
                          zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert diff(new["head"], params["head"]) == 0.0
  assert diff(new_adv["disc"], adv["disc"]) > 0.0
  if mode == "reference":
    assert diff(new["encoder"], params["encoder"]) == 0.0
  else:
    assert diff(new["encoder"]["layers"], params["encoder"]["layers"]) > 1e-4
  assert np.isfinite(float(m["disc_loss"]))


def test_adversarial_step_is_unchanged_by_cutting_padding():
  """train mgfte cuts the adversarial batch to a length bucket; without dropout (whose masks
  depend on the shape) the update must equal the one on the full padded length."""
  bcfg = dataclasses.replace(BCFG, hidden_dropout=0.0, attention_dropout=0.0)
  params = make_params(model_lib.Config())
  enc_tx, disc_tx = adversarial.encoder_optimizer(1e-3), adversarial.discriminator_optimizer()
  adv = adversarial.init_state(jax.random.key(5), params, BCFG.hidden_size, enc_tx, disc_tx)
  step = adversarial.make_step(bcfg, "inverted", enc_tx, disc_tx)
  src, tgt = make_batch(5, s_lengths=6), make_batch(6, q_lengths=7)
  arrays = [src["s_ids"].reshape(-1, L), src["s_mask"].reshape(-1, L),
            tgt["q_ids"].reshape(-1, L), tgt["q_mask"].reshape(-1, L)]
  rng = jax.random.key(0, impl="rbg")
  full, _, _ = step(params, adv, *arrays, rng)
  cut, _, _ = step(params, adv, *[a[:, :training.bucket_cut((7,), *arrays[1::2])] for a in arrays],
                   rng)
  for a, b in zip(jax.tree.leaves(full["encoder"]), jax.tree.leaves(cut["encoder"])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  assert training.bucket_cut((7,), *arrays[1::2]) == 7 and training.bucket_cut((5,), arrays[1]) == L
