"""`jaxmm convert` / `jaxmm export` for Qwen2-VL and Qwen2.5-VL: both key layouts, shape
checks, and the round trip back to a transformers folder."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import jaxmm
from jaxmm.converters.cli import convert_folder
from jaxmm.converters.export import export_folder
from jaxmm.errors import ConversionError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from qwen_tiny import batch, hf_logits, tiny_qwen  # noqa: E402

INPUTS = [[("image", (1, 4, 6))], [("video", (2, 4, 4))]]


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_convert_hub_layout_and_export_round_trip(model_type, tmp_path):
  model, _, _ = tiny_qwen(model_type, seed=5)
  model.save_pretrained(tmp_path / "hf")   # transformers 5 writes the hub layout
  convert_folder(tmp_path / "hf", tmp_path / "jx")
  m = jaxmm.load(tmp_path / "jx")
  assert m.family == "qwen2_vl" and m.config.model_type == model_type
  inputs = batch(INPUTS, seed=1)
  ref = hf_logits(model, inputs)
  out = np.asarray(jaxmm.forward(m, **inputs).logits)
  assert np.abs(out - ref)[inputs["attention_mask"].astype(bool)].max() <= 1e-4
  export_folder(tmp_path / "jx", tmp_path / "back")
  back = type(model).from_pretrained(tmp_path / "back").eval()
  want = model.state_dict()
  got = back.state_dict()
  assert sorted(got) == sorted(want)
  for k in want:
    torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_convert_module_layout_and_tied_head(tmp_path):
  """transformers 5 module names (a state_dict saved as is) and tied embeddings."""
  model, _, _ = tiny_qwen("qwen2_vl", seed=6, tie_word_embeddings=True)
  model.config.tie_word_embeddings = True
  model.tie_weights()
  folder = tmp_path / "hf"
  folder.mkdir()
  sd = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
  save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
  (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
  convert_folder(folder, tmp_path / "jx")
  m = jaxmm.load(tmp_path / "jx")
  assert m.config.text.tie_word_embeddings and "lm_head" not in m.params["llm"]
  inputs = batch(INPUTS, seed=2)
  ref = hf_logits(model, inputs)
  out = np.asarray(jaxmm.forward(m, **inputs).logits)
  assert np.abs(out - ref)[inputs["attention_mask"].astype(bool)].max() <= 1e-4


def test_misshapen_tensor_is_named_and_nothing_is_written(tmp_path):
  model, _, _ = tiny_qwen("qwen2_5_vl", seed=7)
  model.save_pretrained(tmp_path / "hf")
  from safetensors.torch import load_file
  sd = load_file(tmp_path / "hf" / "model.safetensors")
  sd["visual.merger.mlp.2.bias"] = sd["visual.merger.mlp.2.bias"][:-1].clone()
  save_file(sd, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ConversionError, match=r"visual\.merger\.mlp\.2\.bias: expected shape"):
    convert_folder(tmp_path / "hf", tmp_path / "jx")
  assert not (tmp_path / "jx").exists()


def test_flat_hub_config_reads_like_the_nested_one():
  """The hub's flat config.json (text keys at the top, rope_scaling type mrope, in_chans)."""
  from jaxmm.config import Qwen2VLConfig, qwen25_vl_7b
  flat = {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0,
      "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
      "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
      "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
      "max_window_layers": 28, "model_type": "qwen2_5_vl", "num_attention_heads": 28,
      "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
      "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True,
      "use_sliding_window": False, "vocab_size": 152064,
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280,
                        "intermediate_size": 3420, "num_heads": 16, "in_chans": 3,
                        "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                        "spatial_patch_size": 14, "window_size": 112,
                        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                        "temporal_patch_size": 2}}
  assert Qwen2VLConfig.from_hf(flat) == qwen25_vl_7b()
