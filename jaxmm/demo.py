"""`make demo` (interim, until the trained digits-VQA demo lands): the whole pipeline end to end.

Builds a small randomly initialised LLaVA with transformers from a config, saves it as a Hugging
Face folder with a local tokenizer and processor, converts it with `jaxmm convert`, and asks it
about a real handwritten digit (scikit-learn's bundled UCI digits). The weights are random, so
the answer is noise: the point is that conversion, preprocessing, the chat template, the jitted
prefill and the KV-cache decode loop all run, with nothing downloaded.
"""
import os
import time
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("JAXMM_CACHE", Path(__file__).resolve().parents[1] / "cache"))
WORDS = ("what", "digit", "is", "this", "?", *[str(d) for d in range(10)], "yes", "no")


def build_hf_folder(folder: Path) -> None:
  """A tiny random LLaVA (CLIP 56px/patch 7 -> 64 visual tokens) saved with its processor."""
  import torch
  from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

  from jaxmm.data.tokenizer import llava_processor, word_tokenizer
  tok = word_tokenizer(WORDS)
  vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, image_size=56, patch_size=7)
  tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  torch.manual_seed(0)
  cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tok.image_token_id)
  LlavaForConditionalGeneration(cfg).save_pretrained(folder)
  llava_processor(tok, 56, 7).save_pretrained(folder)


def digit_png(path: Path) -> int:
  """Writes the first UCI digit, upscaled to 56x56 RGB, as a PNG; returns its label."""
  from PIL import Image
  from sklearn.datasets import load_digits
  d = load_digits()
  img = (d.images[0] * (255 / 16)).astype(np.uint8)
  Image.fromarray(img).resize((56, 56), Image.NEAREST).convert("RGB").save(path)
  return int(d.target[0])


def main() -> int:
  import jaxmm
  from converters.cli import convert_folder
  from jaxmm.generate_cli import answer
  work = CACHE / "demo-random"
  work.mkdir(parents=True, exist_ok=True)
  t0 = time.perf_counter()
  build_hf_folder(work / "hf")
  convert_folder(work / "hf", work / "jaxmm", overwrite=True)
  label = digit_png(work / "digit.png")
  m = jaxmm.load(work / "jaxmm")
  text = answer(m, "what digit is this ?", work / "digit.png", max_new_tokens=8)
  print(f"model:  {work / 'jaxmm'} (random weights: the answer is noise)")
  print(f"image:  {work / 'digit.png'} (a handwritten {label})")
  print("prompt: what digit is this ?")
  print(f"answer: {text!r}")
  print(f"done in {time.perf_counter() - t0:.1f}s")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
