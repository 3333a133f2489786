"""The training-only signals of `jaxmm.train.vlm` against straightforward NumPy references."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmm import inputs
from jaxmm.data import digits_vqa
from jaxmm.models import llama, llava
from jaxmm.train import vlm, vlm_task

# 2x2 cells of 2x2 tiles, 8 px tiles = patches: 16 visual tokens, one with ink per cell. Two KV
# groups, so the counting head (head 2) reads other keys than the lookup head 0.
TC = dataclasses.replace(vlm.tiny(), data=digits_vqa.DigitsVQAConfig(grid=2, cell_px=16, tiles=2),
                         patch_size=8, aux_pool="ink", ground_weight=1.0, ground_layer=1,
                         text_heads=4, text_kv_heads=2,
                         count_head="histogram", early_weight=1.0, early_layer=1,
                         probe_weight=1.0, probe_layer=1, cell_weight=1.0, train_images=8,
                         rope_theta=500.0)


@pytest.fixture(scope="module")
def run():
  return vlm.Run(TC)


def test_ink_patches_are_the_patches_with_any_nonzero_pixel():
  images, _ = digits_vqa.make_split(TC.data, "test", 3, seed=0)
  got = np.asarray(vlm_task.ink_patches(TC, vlm_task.pixel_values(images)))
  want = images.reshape(3, 4, 8, 4, 8).max((2, 4)).reshape(3, 16) > 0
  np.testing.assert_array_equal(got, want)
  assert (want.reshape(3, 2, 2, 2, 2).transpose(0, 1, 3, 2, 4).reshape(3, 4, 4).sum(-1) <= 1).all()


def test_question_keys_and_where_they_sit_in_a_conversation(run):
  assert vlm_task.question_key("cell", "What digit is in row 2 , column 1 ?", 2) == 2
  assert vlm_task.question_key("count", "How many times does 7 appear ?", 2) == 4 + 7
  assert vlm_task.question_key("presence", "Is there a 0 in the grid ?", 3) == 9 + 10
  enc = vlm_task.Encoder(run.tok, run.cfg.num_image_tokens, run.cfg.image_token_id)
  ids, target, key = enc.conversation([("Is there a 3 in the grid?", "no"),
                                       ("How many times does 1 appear?", "2")], [7, 5])
  at = [i for i, k in enumerate(key) if k >= 0]
  assert [key[i] for i in at] == [7, 5]
  assert [target[i + 1] and not target[i] for i in at] == [True, True]   # next token: the answer
  assert run.tok.convert_ids_to_tokens([ids[i + 1] for i in at]) == ["no", "2"]


def _rope_np(x_TxK, pos_T, theta):
  half = x_TxK.shape[-1] // 2
  ang = pos_T[:, None] * theta ** (-np.arange(half) * 2.0 / x_TxK.shape[-1])[None]
  sin, cos = np.sin(np.concatenate([ang, ang], -1)), np.cos(np.concatenate([ang, ang], -1))
  rot = np.concatenate([-x_TxK[:, half:], x_TxK[:, :half]], -1)
  return x_TxK * cos + rot * sin


def _grounding_np(run, h_BxTxD, ids, key, cells, pixels, count_head):
  """Head 0: -log attention mass on the relevant ink patches; with count_head, head 2 (the
  first of the second KV group) at count questions: cross-entropy to uniform over every ink
  patch. By loops over plain arrays."""
  cfg, p = run.cfg.text, jax.tree.map(np.asarray, run.state["params"]["llm"]["layers"])
  hd, layer, g2 = cfg.head_dim, TC.ground_layer, 4
  pix = np.asarray(pixels)[:, 0]
  ink = pix.reshape(len(pix), 4, 8, 4, 8).max((2, 4)).reshape(len(pix), 16) > pix.min() + 1e-3
  patch_cell = [(j // 4 // 2) * 2 + (j % 4) // 2 for j in range(16)]
  losses = []
  for b in range(len(ids)):
    valid = ids[b] != cfg.pad_token_id
    pos = np.cumsum(valid) - 1
    h = np.asarray(h_BxTxD[b], np.float64)
    x = h / np.sqrt((h ** 2).mean(-1, keepdims=True) + cfg.rms_norm_eps)
    x = x * p["attn_norm"]["scale"][layer]
    slots = np.flatnonzero(ids[b] == run.cfg.image_token_id)
    for t in np.flatnonzero(key[b] >= 0):
      kt = key[b, t]
      rel = [slots[j] for j in range(16) if ink[b, j] and (
          patch_cell[j] == kt if kt < g2 else cells[b, patch_cell[j]] == (kt - g2) % 10)]
      seen = valid & (np.arange(len(valid)) <= t)

      def attention(head):
        kv = head // (cfg.num_heads // cfg.num_kv_heads)
        q = _rope_np(x @ p["attn"]["q"]["kernel"][layer][:, head * hd:(head + 1) * hd], pos,
                     cfg.rope_theta)
        k = _rope_np(x @ p["attn"]["k"]["kernel"][layer][:, kv * hd:(kv + 1) * hd], pos,
                     cfg.rope_theta)
        s = np.where(seen, k @ q[t] / np.sqrt(hd), -np.inf)
        return np.exp(s - s.max()) / np.exp(s - s.max()).sum()
      counting = g2 <= kt < g2 + 10
      if rel:                                            # head 0: every lookup
        losses.append(-np.log(attention(0)[rel].sum()))
      if counting and count_head == "histogram":         # head 2: count questions
        losses.append(-np.log(attention(2)[slots[ink[b]]]).mean())
  return np.mean(losses)


@pytest.mark.parametrize("count_head", ["histogram", ""])
def test_grounding_loss_equals_the_attention_mass_computed_by_hand(run, count_head):
  tc = dataclasses.replace(TC, count_head=count_head)
  rows = np.arange(4)
  ids, key = run.ids[rows], run.key[rows]
  px, cells = run.pixels(rows), run.cells[rows]
  params, cfg = run.state["params"], run.cfg
  # A random-init model attends almost uniformly: perturb the weights so the check has teeth.
  leaves, tree = jax.tree.flatten(params["llm"])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = {**params, "llm": jax.tree.unflatten(tree, [
      a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])}
  run = type("R", (), {"cfg": cfg, "state": {"params": params}})
  valid = ids != cfg.text.pad_token_id
  slots = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
  pos, mask = inputs.positions_from_mask(valid), llama.attention_mask(slots, valid)
  feats = llava.image_features(cfg, params, px)
  x = llava.merge_image_features(cfg, llama.embed(cfg.text, params["llm"], ids), ids, feats)
  ys = llama.run_layers(cfg.text, params["llm"]["layers"], x, pos, mask, stack=("hidden",)).stacked
  h = ys["hidden"][TC.ground_layer - 1]
  _, _, logp = vlm_task.decoder_pass(cfg, tc, params, ids, feats)   # the training forward's capture
  for fn in (vlm_task.grounding_loss, jax.jit(vlm_task.grounding_loss, static_argnums=(0, 1))):
    got = fn(cfg, tc, logp, mask, ids, key, cells, px)
    want = _grounding_np(run, h, ids, key, cells, px, count_head)
    np.testing.assert_allclose(got, want, rtol=2e-5)


def test_cell_probe_is_near_zero_on_one_hot_cells_and_log_cells_on_nothing():
  cfg = type("C", (), {"text": type("T", (), {"rms_norm_eps": 1e-6})})
  cell = vlm_task.cell_of_patch(TC)                                   # [16] in 0..3
  feats = np.eye(8, dtype=np.float32)[cell][None]                # channel c <- cell c
  sharp = {"cell": np.pad(50 * np.eye(4, dtype=np.float32), ((0, 4), (0, 0)))}
  assert float(vlm_task.cell_loss(cfg, TC, sharp, feats)) < 1e-3
  blank = {"cell": np.zeros((8, 4), np.float32)}
  np.testing.assert_allclose(vlm_task.cell_loss(cfg, TC, blank, feats), np.log(4), rtol=1e-6)
  wrong = {"cell": np.pad(50 * np.eye(4, dtype=np.float32)[::-1], ((0, 4), (0, 0)))}
  assert float(vlm_task.cell_loss(cfg, TC, wrong, feats)) > 10


def test_every_auxiliary_signal_trains_and_is_logged(run):
  recs = [run.step(s) for s in (1, 2)]
  for name in ("aux_loss", "probe_loss", "ground_loss", "cell_loss", "early_loss"):
    assert all(np.isfinite(r[name]) and r[name] > 0 for r in recs), name
  assert not np.allclose(np.asarray(run.state["aux"]["cell"]), 0)
  assert not np.allclose(np.asarray(run.state["aux"]["probe"]), 0)


@pytest.mark.parametrize("change, match", [
    (dict(aux_pool="mean"), "aux_pool must be"),
    (dict(ground_layer=2), "ground_layer must be in 1..1"),
    (dict(probe_layer=0), "probe_layer must be in 1..1"),
    (dict(early_layer=2), "early_layer must be in 1..1"),
    (dict(count_head="sink"), "count_head must be"),
    (dict(patch_size=32), "grid cells must align with patches"),
    (dict(drop_prob=1.5), "drop_prob and drop_max must lie in"),
    (dict(drop_max=-0.1), "drop_prob and drop_max must lie in"),
])
def test_a_config_the_losses_cannot_use_is_refused_before_any_work(change, match):
  from jaxmm.errors import JaxmmError
  with pytest.raises(JaxmmError, match=match):
    vlm.Run(dataclasses.replace(TC, **change))


def test_early_answer_loss_reads_the_answer_through_the_lm_head(run):
  """At each answer-predicting token (key >= 0) the next token is the answer; by hand."""
  cfg, llm = run.cfg, run.state["params"]["llm"]
  rows = np.arange(3)
  ids, key = run.ids[rows], run.key[rows]
  h = jax.random.normal(jax.random.key(2), ids.shape + (cfg.text.hidden_size,))
  got = float(vlm_task.early_answer_loss(cfg, llm, h, ids, key))
  logits = np.asarray(llama.lm_logits(cfg.text, llm, h), np.float64)
  want = []
  for b, t in zip(*np.nonzero(key >= 0)):
    z = logits[b, t]
    want.append(np.log(np.exp(z - z.max()).sum()) + z.max() - z[ids[b, t + 1]])
  assert len(want) >= 3 * 3                        # every image has 3 categories of questions
  np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, want", [(4, 2, 2), (8, 4, 2), (4, 1, 1), (2, 2, 1)])
def test_the_counting_head_shares_no_keys_with_the_lookup_head(heads, kv_heads, want):
  cfg = type("C", (), {"text": type("T", (), {"num_heads": heads, "num_kv_heads": kv_heads})})
  head = vlm_task.counting_head(cfg)
  assert head == want
  group = heads // kv_heads
  assert kv_heads == 1 or head // group != 0            # another KV group than head 0's


def test_the_drop_augmentation_removes_only_blank_visual_tokens(run):
  tc = dataclasses.replace(TC, drop_prob=1.0, drop_max=0.9)
  ids, px = run.ids[:8], run.pixels(slice(8))
  draw = lambda t, seed: vlm_task.drop_blank(t, np.random.default_rng(seed), ids, px,
                                             run.cfg.image_token_id)
  dropped = draw(tc, 0)
  img = ids == run.cfg.image_token_id
  ink = np.zeros_like(img)
  ink[img] = np.asarray(vlm_task.ink_patches(TC, px)).reshape(-1)
  assert not (dropped & ~img).any() and not (dropped & ink).any()   # text and ink stay
  blank = (img & ~ink).sum(1)
  assert (dropped.sum(1) <= np.round(0.9 * blank)).all() and dropped.sum() > 0
  np.testing.assert_array_equal(draw(tc, 0), dropped)                # a function of the seed
  assert not draw(TC, 0).any()                                       # off by default


def test_a_dropped_slot_is_removed_as_a_compacting_pruning_stage_removes_it(run):
  """decoder_pass with dropped slots == the decoder run on the kept slots alone, renumbered."""
  tc = dataclasses.replace(TC, drop_prob=1.0, drop_max=0.9, probe_weight=0.0, early_weight=0.0,
                           ground_weight=0.0)
  ids, px = run.ids[:3], run.pixels(slice(3))
  dropped = vlm_task.drop_blank(tc, np.random.default_rng(3), ids, px, run.cfg.image_token_id)
  cfg, params = run.cfg, run.state["params"]
  feats = llava.image_features(cfg, params, px)
  for fn in (vlm_task.decoder_pass, jax.jit(vlm_task.decoder_pass, static_argnums=(0, 1))):
    h = np.asarray(fn(cfg, tc, params, ids, feats, jnp.asarray(dropped))[0])
    x = llava.merge_image_features(cfg, llama.embed(cfg.text, params["llm"], ids), ids, feats)
    for b in range(len(ids)):
      keep = np.flatnonzero((ids[b] != cfg.text.pad_token_id) & ~dropped[b])
      n = len(keep)
      slots = jnp.arange(n)[None]
      want = llama.run_layers(cfg.text, params["llm"]["layers"], x[b:b + 1, keep], slots,
                              llama.attention_mask(slots, jnp.ones((1, n), bool))).x
      np.testing.assert_allclose(h[b, keep], np.asarray(want[0]), rtol=2e-5, atol=2e-5)


def test_a_training_step_uses_the_mask_drawn_for_it():
  """Run.step's loss is loss_fn's under drop_blank's mask for (seed, step), not the unmasked one."""
  r = vlm.Run(dataclasses.replace(TC, drop_prob=1.0))
  rows = vlm.batch_rows(r.tc, 1, len(r.ids))
  batch = (r.ids[rows], r.target[rows], r.key[rows], r.pixels(rows), r.cells[rows])
  dropped = vlm_task.drop_blank(r.tc, np.random.default_rng([r.tc.seed, 1, 1]), r.ids[rows],
                                r.pixels(rows), r.cfg.image_token_id)
  assert dropped.any()
  train = jax.tree.map(np.array, {k: v for k, v in r.state.items() if k != "opt_state"})
  loss = lambda mask: float(vlm_task.loss_fn(r.cfg, r.tc, r.digit_ids, train, *batch, mask,
                                             False, int(r.target[:, 1:].sum(1).max()))[0])
  got = r.step(1)["loss"]   # the loss before the update (the step donates the old state)
  np.testing.assert_allclose(got, loss(dropped), rtol=1e-5)
  assert abs(got - loss(np.zeros_like(dropped))) > 1e-4


def test_the_training_decoder_recomputes_its_layers_in_the_backward_pass(run):
  """decoder_pass differentiates through `jax.checkpoint`ed layers (`llama.Decoder.remat`, whose
  gradients tests/models/test_remat.py checks): saving them cost the step a third of its time."""
  ids, px = run.ids[:2], run.pixels(slice(2))
  cfg, params = run.cfg, run.state["params"]
  feats = llava.image_features(cfg, params, px)
  loss = lambda p: jnp.sum(vlm_task.decoder_pass(cfg, TC, p, ids, feats)[0] ** 2)
  assert "remat2[" in str(jax.make_jaxpr(jax.grad(loss))(params))   # jax.checkpoint's primitive
