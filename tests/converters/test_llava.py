"""`jaxmm convert` on tiny random LLaVA / LLaMA checkpoints: every array equals the torch tensor."""
import json
import re

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_model

from jaxmm.converters import common, llava
from jaxmm.converters.cli import convert_folder
from hf_fixtures import (CHAT_TEMPLATE, assert_trees_equal, expected_llama_tree,
                         expected_llava_tree, hf_folder, layout_state_dict, tiny_llama,
                         tiny_llava)
from jaxmm import checkpoint

@pytest.fixture(scope="module")
def llava_mha():
  return tiny_llava(gqa=False, bias=True)


def convert_and_load(src, tmp_path, **kw):
  out = convert_folder(src, tmp_path / "out", **kw)
  return out, checkpoint.read_meta(out), checkpoint.load_params(out)


def assert_aux_copied(src, out):
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    assert (out / name).read_bytes() == (src / name).read_bytes(), name
  assert json.loads((out / "hf_config.json").read_text()) == json.loads((src / "config.json").read_text())
  assert CHAT_TEMPLATE in (out / "chat_template.jinja").read_text()


def test_save_pretrained_writes_the_hf_layout(tmp_path, llava_mha):
  src = hf_folder(tmp_path, llava_mha)
  names = common.TensorSource.open(src).names()
  assert sorted(names) == sorted(layout_state_dict(llava_mha, "hf"))
  assert llava.detect_layout(names) == "hf"


@pytest.mark.parametrize("gqa,bias,layout,mode,feature_layer", [
    (False, True, "hf", "save_pretrained", -2),
    (True, False, "hf", "save_pretrained_sharded", -1),
    (True, True, "hub", "sharded", [-2, -1]),
    (False, False, "hub", "bin", -2),
    (True, True, "module", "sharded_bin", -2),
])
def test_llava_round_trip(tmp_path, gqa, bias, layout, mode, feature_layer):
  model = tiny_llava(gqa=gqa, bias=bias, feature_layer=feature_layer)
  sd = None if mode.startswith("save_pretrained") else layout_state_dict(model, layout)
  src = hf_folder(tmp_path, model, mode, sd)
  out, meta, params = convert_and_load(src, tmp_path)
  assert meta["family"] == "llava"
  assert meta["config"]["text"]["num_kv_heads"] == (2 if gqa else 4)
  assert_trees_equal(params, expected_llava_tree(model))
  assert_aux_copied(src, out)
  assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("tied,store", [
    (False, "save_pretrained_sharded"),   # untied, sharded safetensors
    (True, "save_pretrained"),            # tied: only the embedding is stored
    (True, "save_model"),                 # tied: safetensors.save_model keeps only lm_head
    (True, "bin"),                        # tied: both names stored, the head is ignored
    (False, "sharded_bin"),
])
def test_llama_round_trip(tmp_path, tied, store):
  model = tiny_llama(tied=tied)
  if store == "save_model":
    src = hf_folder(tmp_path, model, "save_pretrained")
    (src / "model.safetensors").unlink()
    save_model(model, str(src / "model.safetensors"))
  else:
    src = hf_folder(tmp_path, model, store)
  out, meta, params = convert_and_load(src, tmp_path)
  assert meta["family"] == "llama" and meta["config"]["tie_word_embeddings"] == tied
  assert_trees_equal(params, expected_llama_tree(model.model, None if tied else model.lm_head))
  assert_aux_copied(src, out)


def test_bfloat16_output_and_input(tmp_path):
  model = tiny_llama(tied=False).to(dtype=torch.bfloat16)
  src = hf_folder(tmp_path, model, "single")
  _, _, params = convert_and_load(src, tmp_path, dtype="bfloat16")
  want = expected_llama_tree(model.model.float(), model.lm_head.float())
  assert params["embed"].dtype == ml_dtypes.bfloat16
  assert_trees_equal(params, want)  # bf16 -> bf16 is exact


@pytest.mark.parametrize("layout", ["hf", "hub", "module"])
def test_export_inverts_convert(llava_mha, layout):
  sd = layout_state_dict(llava_mha, layout)
  plan = llava.plan_llava(llava_mha.config.to_dict(), list(sd))
  params = common.convert(common.TensorSource.from_state_dict(sd), plan.rules, ignore=plan.ignore)
  back = common.export(params, plan.rules)
  kept = {k for k in sd if not any(re.search(p, k) for p in plan.ignore)}
  assert set(back) == kept
  for k in kept:
    np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)
  again = common.convert(common.TensorSource.from_state_dict(back), plan.rules)
  assert_trees_equal(again, params)
