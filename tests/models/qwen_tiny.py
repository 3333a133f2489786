"""Tiny random Qwen2-VL / Qwen2.5-VL models (no download) and processor-shaped inputs."""
import numpy as np
import torch
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                          Qwen2VLForConditionalGeneration)

from jaxmm.converters.cli import convert_model

IMAGE, VIDEO, START, END = 100, 101, 98, 99   # placeholder and vision start/end token ids
PATCH, TEMPORAL, MERGE = 4, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH


def hf_config(model_type: str = "qwen2_vl", gqa: bool = True, **text_kw):
  text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2 if gqa else 4, vocab_size=120, bos_token_id=1,
              eos_token_id=2, pad_token_id=0,
              rope_parameters=dict(rope_type="default", mrope_section=[2, 2, 2],
                                   rope_theta=10000.0), **text_kw)
  common = dict(depth=3, num_heads=4, patch_size=PATCH, temporal_patch_size=TEMPORAL,
                spatial_merge_size=MERGE)
  ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
             vision_end_token_id=END)
  if model_type == "qwen2_vl":
    vision = dict(common, embed_dim=32, hidden_size=48, mlp_ratio=2)
    return Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
  vision = dict(common, hidden_size=32, out_hidden_size=48, intermediate_size=40, window_size=16,
                fullatt_block_indexes=[1], tokens_per_second=2)
  return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)


def tiny_qwen(model_type: str = "qwen2_vl", seed: int = 0, **kw):
  """(torch model in eval mode, jaxmm config, jaxmm params) with the same random weights."""
  torch.manual_seed(seed)
  cls = (Qwen2VLForConditionalGeneration if model_type == "qwen2_vl"
         else Qwen2_5_VLForConditionalGeneration)
  model = cls(hf_config(model_type, **kw)).eval()
  return (model, *convert_model(model))


def _tokens(grid) -> int:
  t, h, w = grid
  return t * h * w // MERGE ** 2


def batch(examples, seed: int = 0, prefix=3, suffix: int = 4, length: int | None = None):
  """Left-padded inputs as the Qwen processor emits them. `examples`: per example a list of
  ("image" | "video", (t, h, w)) entries (patch grids), each wrapped in vision start/end
  tokens between random text (`prefix`: one length, or one per example). `length` pads every
  prompt to that many slots. Returns a dict with transformers' argument names."""
  rng = np.random.default_rng(seed)
  rows, px, grids = [], {"image": [], "video": []}, {"image": [], "video": []}
  prefixes = [prefix] * len(examples) if isinstance(prefix, int) else list(prefix)
  for entries, pre in zip(examples, prefixes):
    row = list(rng.integers(3, 98, pre))
    for kind, grid in entries:
      n = grid[0] * grid[1] * grid[2]
      px[kind].append(rng.standard_normal((n, PATCH_DIM)).astype(np.float32))
      grids[kind].append(grid)
      row += [START] + [IMAGE if kind == "image" else VIDEO] * _tokens(grid) + [END]
    rows.append(row + list(rng.integers(3, 98, suffix)))
  t = length or max(map(len, rows))
  ids = np.zeros((len(rows), t), np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, row in enumerate(rows):
    ids[i, t - len(row):], mask[i, t - len(row):] = row, 1
  out = {"input_ids": ids, "attention_mask": mask,
         "mm_token_type_ids": np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))}
  for kind, (pn, gn) in {"image": ("pixel_values", "image_grid_thw"),
                         "video": ("pixel_values_videos", "video_grid_thw")}.items():
    if grids[kind]:
      out[pn], out[gn] = np.concatenate(px[kind]), np.asarray(grids[kind], np.int64)
  return out


def hf_text_positions(mask):
  """The positions transformers' generate gives a text-only left-padded prompt (on all axes)."""
  return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def torch_inputs(inputs: dict) -> dict:
  return {k: torch.tensor(v) for k, v in inputs.items()}


def hf_logits(model, inputs: dict) -> np.ndarray:
  with torch.no_grad():
    return model(**torch_inputs(inputs)).logits.numpy()
