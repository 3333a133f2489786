"""`jaxmm train vlm --llm`: a frozen pretrained decoder (here a tiny random LLaMA with a byte-level
BPE tokenizer, converted like SmolLM2), LoRA adapters merged into the saved model."""
import dataclasses

import jax
import numpy as np
import pytest
import torch
from PIL import Image

import jaxmm
from jaxmm.converters.cli import convert_folder
from jaxmm.data import digits_vqa
from jaxmm.errors import JaxmmError
from jaxmm.train import vlm, vlm_task

TC = dataclasses.replace(vlm.smollm2(), steps=3,
                         data=digits_vqa.DigitsVQAConfig(grid=2, cell_px=16), patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                         train_images=32, batch_size=4, warmup=1, probe_layer=1, ground_layer=1,
                         lora_rank=4, ckpt_every=1, log_every=1)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
  """A converted 2-layer LLaMA whose tokenizer is a byte-level BPE, as SmolLM2's is."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
  root = tmp_path_factory.mktemp("llm")
  _, items = digits_vqa.make_split(TC.data, "train", 20, seed=0)
  texts = [f"USER: {q} ASSISTANT: {a}" for qa in items for _, q, a in qa]
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                eos_token="<|im_end|>")
  cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(0)
  LlamaForCausalLM(cfg).save_pretrained(root / "hf")
  tok.save_pretrained(root / "hf")
  convert_folder(root / "hf", root / "jaxmm")
  return root / "jaxmm"


@pytest.fixture(scope="module")
def trained(llm_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("run")
  run = vlm.Run(TC, llm_dir)
  before = jax.tree.map(np.asarray, run.state)
  for step in range(1, 4):
    run.step(step)
  return run, before, run.save_model(out / "model")


def test_prompt_ids_equal_the_processor_for_a_byte_level_bpe(trained):
  from transformers import AutoProcessor
  run, _, model = trained
  proc = AutoProcessor.from_pretrained(model)
  enc = vlm_task.Encoder(run.tok, run.cfg.num_image_tokens, run.cfg.image_token_id)
  images, items = digits_vqa.make_split(TC.data, "test", 2, seed=0)
  for img, qa in zip(images, items):
    for _, q, _ in qa:
      msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
      got = proc(images=Image.fromarray(img).convert("RGB"), return_tensors="np",
                 text=proc.apply_chat_template(msgs, add_generation_prompt=True))
      assert got["input_ids"][0].tolist() == enc.prompt(q)


def test_the_decoder_stays_frozen_and_only_adapters_and_image_side_train(trained):
  run, before, _ = trained
  after = jax.tree.map(np.asarray, run.state)
  for a, b in zip(jax.tree.leaves(before["params"]["llm"]), jax.tree.leaves(after["params"]["llm"])):
    np.testing.assert_array_equal(a, b)
  for name in ("q", "k", "v", "o"):   # b starts at zero and moves; a moves
    assert not before["lora"][name]["b"].any() and after["lora"][name]["b"].any()
    assert not np.array_equal(before["lora"][name]["a"], after["lora"][name]["a"])
  assert not np.array_equal(before["params"]["projector"]["fc1"]["kernel"],
                            after["params"]["projector"]["fc1"]["kernel"])


def test_saved_model_is_the_merged_decoder(trained):
  run, _, model = trained
  m = jaxmm.load(model)
  st = jax.tree.map(np.asarray, run.state)
  for name in ("q", "k", "v", "o"):
    w = st["params"]["llm"]["layers"]["attn"][name]["kernel"].astype(np.float64)
    a, b = st["lora"][name]["a"], st["lora"][name]["b"]
    want = w + np.stack([a[l].astype(np.float64) @ b[l] for l in range(len(a))])
    np.testing.assert_allclose(m.params["llm"]["layers"]["attn"][name]["kernel"], want,
                               rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(m.params["llm"]["layers"]["mlp"]["up"]["kernel"],
                                st["params"]["llm"]["layers"]["mlp"]["up"]["kernel"])


def test_lm_head_on_target_positions_only_gives_the_same_loss_and_gradients(trained):
  run, _, _ = trained
  rows = np.arange(4)
  args = (run.ids[rows], run.target[rows], run.key[rows], run.pixels(rows), run.cells[rows],
          np.zeros(run.ids[rows].shape, bool))
  train = {k: v for k, v in run.state.items() if k != "opt_state"}
  n = int(run.target[:, 1:].sum(1).max())
  grad = jax.value_and_grad(vlm_task.loss_fn, argnums=3, has_aux=True)
  (full, m_full), g_full = grad(run.cfg, TC, run.digit_ids, train, *args, True)
  (part, m_part), g_part = grad(run.cfg, TC, run.digit_ids, train, *args, True, n)
  np.testing.assert_allclose(part, full, rtol=1e-5)
  np.testing.assert_allclose(m_part["answer_token_acc"], m_full["answer_token_acc"])
  for x, y in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_lora_merge_with_zero_b_is_the_pretrained_decoder():
  w = np.random.default_rng(0).normal(size=(2, 8, 6)).astype(np.float32)
  layers = {"attn": {n: {"kernel": w}
                     for n in ("q", "k", "v", "o")}, "mlp": {"up": {"kernel": np.ones((2, 8, 4), np.float32)}}}
  lora = vlm.init_lora(layers, 3, jax.random.key(0))
  merged = vlm.lora_merge(layers, lora)
  for a, b in zip(jax.tree.leaves(layers), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(a, b)


def test_lora_without_a_frozen_decoder_is_refused():
  with pytest.raises(JaxmmError, match="lora_rank 4: LoRA adapts a frozen decoder"):
    vlm.Run(dataclasses.replace(vlm.tiny(), lora_rank=4))


def test_the_demo_cache_fingerprint_is_unchanged_by_the_lora_field():
  # The README and the demo's cache name this folder: adding a field must not retrain it.
  assert vlm.fingerprint(vlm.default()) == "275e293b5b"
  assert vlm.fingerprint(dataclasses.replace(vlm.default(), lora_rank=8)) != "275e293b5b"
