"""GGUF -> Hugging Face folder -> jaxmm, on a tiny GGUF file written in the test."""
import json

import gguf
import numpy as np
import torch
from gguf import GGUFWriter
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import jaxmm.cli
from jaxmm.converters.gguf import gguf_to_hf, smollm2_gguf
from hf_fixtures import assert_trees_equal, expected_llama_tree
from jaxmm import checkpoint

D, F, L, H, HKV, TOKENS = 16, 24, 2, 4, 2, ["<unk>", "<s>", "</s>", "a", "b", "c", "ab", "abc"]


def write_tiny_gguf(path) -> None:
  """A float32 LLaMA with a tied head and a tiny byte-pair tokenizer (ids as in TOKENS)."""
  rng = np.random.default_rng(0)
  w = GGUFWriter(str(path), "llama")
  w.add_block_count(L)
  w.add_context_length(64)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(HKV)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(len(TOKENS))
  w.add_rope_dimension_count(D // H)
  w.add_tokenizer_model("gpt2")
  w.add_token_list(TOKENS)
  w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
  w.add_token_merges(["a b", "ab c"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  rand = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  w.add_tensor("token_embd.weight", rand(len(TOKENS), D))
  w.add_tensor("output_norm.weight", rand(D))
  kv = HKV * D // H
  for i in range(L):
    for name, shape in [("attn_norm", (D,)), ("attn_q", (D, D)), ("attn_k", (kv, D)),
                        ("attn_v", (kv, D)), ("attn_output", (D, D)), ("ffn_norm", (D,)),
                        ("ffn_gate", (F, D)), ("ffn_up", (F, D)), ("ffn_down", (D, F))]:
      w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_to_hf_then_convert(tmp_path):
  gguf_file = tmp_path / "tiny.gguf"
  write_tiny_gguf(gguf_file)
  oracle = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name).eval()

  originals = (gguf.GGUFReader, gguf.get_tensor_name_map)
  hf = gguf_to_hf(gguf_file, tmp_path / "hf")   # parses once (cached reader), same tensors
  assert (gguf.GGUFReader, gguf.get_tensor_name_map) == originals   # the cache is undone
  assert "quantization_config" not in json.loads((hf / "config.json").read_text())
  assert (hf / "tokenizer.json").is_file()
  reloaded = LlamaForCausalLM.from_pretrained(hf).eval()
  for name, v in oracle.state_dict().items():
    torch.testing.assert_close(reloaded.state_dict()[name], v, rtol=0, atol=0, msg=name)

  assert jaxmm.cli.main(["convert", str(gguf_file), str(tmp_path / "out")]) == 0
  out = tmp_path / "out"
  assert checkpoint.read_meta(out)["family"] == "llama"
  assert (out / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
  assert_trees_equal(checkpoint.load_params(out), expected_llama_tree(oracle.model, None))


def test_smollm2_gguf_is_located_without_import():
  path = smollm2_gguf()
  assert path.suffix == ".gguf" and path.stat().st_size > 50e6
