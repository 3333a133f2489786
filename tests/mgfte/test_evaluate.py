"""`training.evaluate` encodes each sentence once and decodes episodes from gathered features;
it must predict what the straightforward loop running `model.predict` per episode predicts."""
import jax
import numpy as np
import pytest

from jaxmm.data import fewrel
from jaxmm.mgfte import training
from jaxmm.mgfte import model as model_lib
from jaxmm.mgfte.episodes import EpisodeSampler
from jaxmm.models import bert

BCFG = bert.Config(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)


@pytest.mark.parametrize("variant", ["mgfte", "baseline"])
def test_cached_features_give_the_per_episode_predictions(variant, tokenizer, shared_data):
  shared_data("fewrel", "mgfte", "test.json")
  data = fewrel.load_split(fewrel.SPLITS["test"], tokenizer, max_per_relation=8)
  mcfg = model_lib.Config(variant=variant)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"encoder": bert.init_params(BCFG, k1), "head": model_lib.init_head(mcfg, 16, k2)}
  predict = jax.jit(lambda p, b: model_lib.predict(p, BCFG, mcfg, b))
  sampler = EpisodeSampler(data, 3, 2, 2, batch=1, seed=5)
  # the buckets exercise both cutting the features and zero-padding them to the episode length
  got = training.predictions(training.make_predict(BCFG, mcfg), params, data, n_way=3, k_shot=2,
                             n_query=2, episodes=6, seed=5, buckets=(40, 64), progress=False)
  n_tagged = 0
  for batch, rel, tags in got:
    want_batch = sampler.sample()
    np.testing.assert_array_equal(batch["q_rows"], want_batch["q_rows"])
    want_rel, want_tags = jax.device_get(predict(params, training.model_inputs(want_batch)))
    np.testing.assert_array_equal(rel, want_rel[0])
    np.testing.assert_array_equal(tags, want_tags[0][:, :tags.shape[-1]])
    n_tagged += int((tags > 0).sum())
  assert n_tagged > 0          # the comparison covers entity tags, not only the O tag


def test_encode_rows_matches_encoding_each_row_alone():
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 30, 11)
  mask = (np.arange(32) < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, rng.integers(1, 500, mask.shape), 0).astype(np.int32)
  enc = bert.init_params(BCFG, jax.random.key(1))
  encode = training.make_predict(BCFG, model_lib.Config()).encode
  got = training.encode_rows(encode, enc, ids, mask, buckets=(8, 16), chunk=4)
  assert got.shape == (11, lengths.max(), 16)
  for r in range(11):
    n = lengths[r]
    want = np.asarray(encode(enc, ids[r:r + 1, :n], mask[r:r + 1, :n]))[0]
    np.testing.assert_allclose(got[r, :n], want, atol=1e-5)
    assert not got[r, n:].any()
