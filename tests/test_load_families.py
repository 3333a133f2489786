"""`jaxmm.load` opens a folder of each family the project writes, through each family's own
writer: `jaxmm convert` (llava, llama, bert), `save_extractor` (mgfte), `loop.save_model` (cadit).
`jaxmm.forward` runs the MG-FTE decode and the CADIT classifier."""
import jax
import numpy as np
import pytest
import torch
import transformers

import jaxmm
from jaxmm.converters.cli import convert_folder, convert_model
from jaxmm import config as config_lib
from jaxmm import registry
from jaxmm.cadit import config as cadit_config
from jaxmm.cadit import evaluate, loop, networks, steps
from jaxmm.errors import InputError, JaxmmError
from jaxmm.mgfte import model as mgfte_model
from jaxmm.mgfte import training
from jaxmm.models import bert
from tiny_hf import llava_hf_config

FAMILIES = ("llava", "llama", "bert", "mgfte", "cadit")


def _converted(tmp, model):
  """A tiny transformers model through `jaxmm convert` -> (folder, config, params) it holds."""
  model.save_pretrained(tmp / "hf")
  cfg, params = convert_model(model)
  return convert_folder(tmp / "hf", tmp / "jaxmm"), cfg, params


def _llava(tmp):
  torch.manual_seed(0)
  return _converted(tmp, transformers.LlavaForConditionalGeneration(llava_hf_config()).eval())


def _llama(tmp):
  torch.manual_seed(0)
  return _converted(tmp, transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2)).eval())


def _bert(tmp):
  torch.manual_seed(0)
  return _converted(tmp, transformers.BertModel(transformers.BertConfig(
      vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=20, max_position_embeddings=16)).eval())


MGFTE_BERT = bert.Config(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                         intermediate_size=20, max_position_embeddings=16)


def _mgfte(tmp):
  cfg = training.ExtractorConfig(MGFTE_BERT, mgfte_model.Config())
  k_enc, k_head = jax.random.split(jax.random.key(0))
  params = jax.device_get({"encoder": bert.init_params(cfg.bert, k_enc),
                           "head": mgfte_model.init_head(cfg.mgfte, cfg.bert.hidden_size, k_head)})
  (tmp / "tok").mkdir()
  (tmp / "tok" / "vocab.txt").write_text("[PAD]\n[UNK]\n")
  training.save_extractor(tmp / "mgfte", cfg.bert, cfg.mgfte, params, tmp / "tok")
  return tmp / "mgfte", cfg, params


def _cadit(tmp):
  spec = loop.RunSpec(cadit_config.tiny(), "usps-mnist", seed=3)
  key = jax.random.key(0, impl="rbg")  # rbg keys and no LLVM optimisation: compiles in ~2 s
  init = jax.jit(lambda k: networks.init_params(spec.cfg, k)).lower(key).compile(steps.FAST_COMPILE)
  params = jax.device_get(init(key))
  loop.save_model(tmp / "model", spec, params)
  return tmp / "model", spec, params


BUILDERS = {"llava": _llava, "llama": _llama, "bert": _bert, "mgfte": _mgfte, "cadit": _cadit}
CONFIG_TYPES = {"llava": config_lib.LlavaConfig, "llama": config_lib.LlamaConfig,
                "bert": bert.Config, "mgfte": training.ExtractorConfig, "cadit": loop.RunSpec}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """family -> (folder, the config written, the params written), each built once, on first use."""
  cache = {}

  def get(family):
    if family not in cache:
      cache[family] = BUILDERS[family](tmp_path_factory.mktemp(family))
    return cache[family]

  return get


@pytest.fixture(params=FAMILIES)
def saved(request, built):
  return (request.param, *built(request.param))


@pytest.fixture
def folders(built):
  """The mgfte and cadit folders opened, for the forward tests: family -> (Model, params)."""
  return {f: (jaxmm.load(built(f)[0]), built(f)[2]) for f in ("mgfte", "cadit")}


def _assert_same_tree(got, want):
  flat = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]
  got, want = flat(got), flat(want)
  assert [jax.tree_util.keystr(p) for p, _ in got] == [jax.tree_util.keystr(p) for p, _ in want]
  for (path, a), (_, b) in zip(got, want):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_every_family_is_registered():
  assert set(FAMILIES) <= set(registry.FAMILIES)


def test_load_opens_the_folder_each_family_writes(saved):
  family, folder, cfg, params = saved
  m = jaxmm.load(folder)
  assert m.family == family and m.path == folder
  assert type(m.config) is CONFIG_TYPES[family]
  assert m.config == cfg
  _assert_same_tree(m.params, params)


def test_expected_family_is_checked_before_reading_params(saved):
  family, folder, _, _ = saved
  other = "bert" if family != "bert" else "mgfte"
  with pytest.raises(JaxmmError, match=f"holds a '{family}' model, not a '{other}' one"):
    jaxmm.load(folder, family=other)
  assert jaxmm.load(folder, family=family).family == family


def test_family_readers_are_jaxmm_load(saved):
  """`load_extractor` and `load_model` give what `jaxmm.load` gives, and refuse other families."""
  family, folder, cfg, params = saved
  if family == "mgfte":
    bcfg, mcfg, got = training.load_extractor(folder)
    assert (bcfg, mcfg) == (cfg.bert, cfg.mgfte)
  elif family == "cadit":
    ccfg, got, meta = loop.load_model(folder)
    assert ccfg == cfg.cfg and meta == cfg.meta()
  else:
    for reader in (training.load_extractor, loop.load_model):
      with pytest.raises(JaxmmError, match=f"holds a '{family}' model"):
        reader(folder)
    return
  _assert_same_tree(got, params)


def _episodes(seed=0, b=1, n=2, k=2, nq=3, length=7):
  r = np.random.default_rng(seed)
  lengths = lambda shape: r.integers(3, length + 1, shape)[..., None]
  mask = lambda shape: (np.arange(length) < lengths(shape)).astype(np.int32)
  s_mask, q_mask = mask((b, n, k)), mask((b, nq))
  return {"s_ids": r.integers(1, 50, (b, n, k, length)) * s_mask, "s_mask": s_mask,
          "s_tags": r.integers(0, 5, (b, n, k, length)) * s_mask,
          "q_ids": r.integers(1, 50, (b, nq, length)) * q_mask, "q_mask": q_mask}


def test_mgfte_forward_decodes_episodes(folders):
  m, _ = folders["mgfte"]
  batch = _episodes()
  out = jaxmm.forward(m, **batch, q_rel=np.zeros((1, 3), np.int32))
  assert out.relation.shape == (1, 3) and out.tags.shape == (1, 3, 7)
  # The evaluation path: each sentence encoded on its own, then the head decodes the features.
  pred = training.make_predict(m.config.bert, m.config.mgfte)
  feats = lambda ids, mask: pred.encode(m.params["encoder"], ids.reshape(-1, 7),
                                        mask.reshape(-1, 7)).reshape(ids.shape + (-1,))
  rel, tags = pred.decode(m.params["head"], feats(batch["s_ids"], batch["s_mask"]),
                          feats(batch["q_ids"], batch["q_mask"]), batch)
  np.testing.assert_array_equal(out.relation, rel)
  np.testing.assert_array_equal(out.tags, tags)


@pytest.mark.parametrize("change,needle", [
    (lambda b: {k: v for k, v in b.items() if k != "q_mask"}, r"missing \['q_mask'\]"),
    (lambda b: {**b, "pixel_values": b["q_ids"]}, r"unknown \['pixel_values'\]"),
    (lambda b: {**b, "q_ids": b["q_ids"][0]}, r"q_ids \[3, 7\]"),
])
def test_mgfte_forward_bad_inputs(folders, change, needle):
  with pytest.raises(InputError, match=needle):
    jaxmm.forward(folders["mgfte"][0], **change(_episodes()))


def test_cadit_forward_classifies_images(folders):
  m, params = folders["cadit"]
  cfg = m.config.cfg
  shape = (5, cfg.image_size, cfg.image_size, cfg.channels)
  x = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
  probs = np.asarray(jaxmm.forward(m, images=x).probs)
  assert probs.shape == (5, cfg.num_classes)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(probs.argmax(-1), evaluate.predict(cfg, params, x))
  with pytest.raises(InputError, match=r"CADIT images must be f32\[B, 16, 16, 1\]"):
    jaxmm.forward(m, images=x[..., 0])
