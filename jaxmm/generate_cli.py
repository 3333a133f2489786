"""Generate an answer with a converted model: `jaxmm generate --model OUT --image PATH --prompt TEXT`.

The prompt goes through the model's chat template (from the tokenizer/processor files that
`jaxmm convert` copied into OUT); decoding is greedy with a KV cache.
"""
import argparse
from pathlib import Path

import numpy as np

import jaxmm.cli
from jaxmm import api
from jaxmm.errors import InputError


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--model", required=True, help="a folder written by `jaxmm convert`")
  p.add_argument("--image", help="image file (required for LLaVA models)")
  p.add_argument("--prompt", required=True, help="the user's question")
  p.add_argument("--max-new-tokens", type=int, default=32)


def _load_image(path):
  from PIL import Image, UnidentifiedImageError
  try:
    return Image.open(path).convert("RGB")
  except (FileNotFoundError, UnidentifiedImageError, OSError) as e:
    raise InputError(f"cannot read image {path}: {e}") from None


def prepare(model_dir, prompt: str, image_path=None, family="llava"):
  """Chat-templated inputs as numpy: (input_ids, attention_mask, pixel_values or None, tokenizer)."""
  from transformers import AutoProcessor, AutoTokenizer
  if not prompt.strip():
    raise InputError("the prompt is empty")
  if family == "llava":
    if image_path is None:
      raise InputError("a LLaVA model needs --image")
    proc = AutoProcessor.from_pretrained(model_dir)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True)
    enc = proc(images=_load_image(image_path), text=text, return_tensors="np")
    return enc["input_ids"], enc["attention_mask"], enc["pixel_values"], proc.tokenizer
  tok = AutoTokenizer.from_pretrained(model_dir)
  ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
  ids = np.asarray(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)[None]
  return ids, np.ones_like(ids), None, tok


def answer(m, prompt: str, image_path=None, max_new_tokens: int = 32) -> str:
  """The decoded greedy answer of a loaded model to one prompt (and image)."""
  ids, mask, px, tok = prepare(m.path, prompt, image_path, m.family)
  new = api.generate(m, input_ids=ids, attention_mask=mask, pixel_values=px,
                     max_new_tokens=max_new_tokens)
  return tok.decode(new[0], skip_special_tokens=True).strip()


def run(args) -> int:
  m = api.load(Path(args.model))
  print(answer(m, args.prompt, args.image, args.max_new_tokens))
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
