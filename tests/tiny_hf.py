"""Tiny random Hugging Face models built from a config (no download), and their jaxmm params."""
import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from jaxmm.converters.cli import convert_model

IMAGE_TOKEN = 100


def llava_hf_config(gqa=True, feature_layer=-2, strategy="default", **text_kw) -> LlavaConfig:
  vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, image_size=28, patch_size=7)
  tc = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2 if gqa else 4, vocab_size=120, head_dim=12,
                   eos_token_id=2, pad_token_id=0, **text_kw)
  return LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN,
                     vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy)


def tiny_llava(seed=0, **kw):
  """(torch model in eval mode, jaxmm config, jaxmm params) with identical random weights."""
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration(llava_hf_config(**kw)).eval()
  return (model, *to_jaxmm(model))


def to_jaxmm(model):
  return convert_model(model)


def llava_batch(cfg, seed=0, pad=(0, 2), prefix=3, suffix=5):
  """Left-padded batch of 2: text, image placeholders, text. Returns (ids, mask, pixels)."""
  rng = np.random.default_rng(seed)
  b = len(pad)
  ids = np.concatenate([rng.integers(3, IMAGE_TOKEN, (b, prefix)),
                        np.full((b, cfg.num_image_tokens), IMAGE_TOKEN),
                        rng.integers(3, IMAGE_TOKEN, (b, suffix))], axis=1)
  mask = np.ones_like(ids)
  for i, p in enumerate(pad):
    mask[i, :p] = 0
    ids[i, :p] = 0
  px = rng.standard_normal((b, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
  return ids, mask, px


def hf_positions(mask):
  """Position ids transformers' generate uses for left-padded prompts."""
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


WORDS = ("what", "digit", "is", "this", "?", *[str(d) for d in range(10)], "yes", "no")


def build_hf_folder(folder) -> None:
  """A tiny random LLaVA (CLIP 56px/patch 7 -> 64 visual tokens) saved with its processor."""
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


def digit_png(path) -> int:
  """Writes the first UCI digit, upscaled to 56x56 RGB, as a PNG; returns its label."""
  from PIL import Image
  from sklearn.datasets import load_digits
  d = load_digits()
  img = (d.images[0] * (255 / 16)).astype(np.uint8)
  Image.fromarray(img).resize((56, 56), Image.NEAREST).convert("RGB").save(path)
  return int(d.target[0])


def tiny_llava_config():
  """The jaxmm LlavaConfig of `llava_hf_config()`'s shape, for tests that need no torch model
  (abstract params, plans): CLIP 28 px / patch 7 (16 visual tokens), a 3-layer GQA LLaMA."""
  from jaxmm import config as config_lib
  return config_lib.LlavaConfig(
      vision=config_lib.ClipVisionConfig(hidden_size=32, intermediate_size=64, num_layers=3,
                                         num_heads=4, image_size=28, patch_size=7),
      text=config_lib.LlamaConfig(vocab_size=120, hidden_size=48, intermediate_size=96,
                                  num_layers=3, num_heads=4, num_kv_heads=2, head_dim=12),
      image_token_id=IMAGE_TOKEN)
