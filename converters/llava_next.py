"""Name tables for LLaVA-NeXT (`model_type` "llava_next"): LLaVA-1.5's table plus `image_newline`.

LLaVA-NeXT checkpoints use LLaVA's key layouts (`converters.llava.LAYOUTS`): what transformers 5
`save_pretrained` writes, the older hub layout with `vision_tower.vision_model.` (e.g.
llava-hf/llava-v1.6-vicuna-7b-hf) and transformers' module names. The learned newline
embedding is `image_newline` in the first two and `model.image_newline` in the last. `hf_config`
and `tensors` are the inverse, used by `jaxmm export`.
"""
import dataclasses

import numpy as np

from jaxmm.converters import llava as llava_conv
from jaxmm.converters.common import Plan, Rule
from jaxmm.config import LlavaNextConfig

NEWLINE = {"hf": "image_newline", "hub": "image_newline", "module": "model.image_newline"}


def rules(cfg: LlavaNextConfig, layout: str = "hf", embed: str | None = None) -> list[Rule]:
  """The whole LLaVA-NeXT table for one of `llava.LAYOUTS` (`embed`: see `llava.llama_rules`)."""
  return [*llava_conv.llava_rules(cfg, layout, embed),
          Rule(NEWLINE[layout], "image_newline", (cfg.text.hidden_size,), axes=("embed",))]


def plan(hf_config: dict, names) -> Plan:
  """Config + rules for a `model_type: llava_next` checkpoint holding tensors `names`."""
  cfg = LlavaNextConfig.from_hf(hf_config)
  layout = llava_conv.detect_layout(names)
  vision, _, body, head = llava_conv.LAYOUTS[layout]
  embed, head_ignore = llava_conv._tied_head(cfg.text.tie_word_embeddings, names, body, head)
  return Plan("llava_next", cfg, rules(cfg, layout, embed),
              llava_conv._ignore(vision) + head_ignore)


def hf_config(cfg: LlavaNextConfig):
  """transformers' LlavaNextConfig with every field that changes the math taken from `cfg`."""
  from transformers import LlavaNextConfig as HFLlavaNext
  from jaxmm.converters import export  # the LLaVA fields are LLaVA-1.5's
  base = export.hf_config(cfg)
  return HFLlavaNext(vision_config=base.vision_config, text_config=base.text_config,
                     image_token_index=cfg.image_token_id,
                     projector_hidden_act=cfg.projector_hidden_act,
                     vision_feature_layer=base.vision_feature_layer,
                     vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                     multimodal_projector_bias=cfg.multimodal_projector_bias,
                     tie_word_embeddings=cfg.text.tie_word_embeddings,
                     image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints])


def tensors(m) -> dict:
  """{transformers tensor name: torch tensor} of a loaded LLaVA-NeXT `jaxmm.Model`: LLaVA's
  tensors (`export.tensors`) and the newline embedding."""
  from jaxmm.converters import export
  params = dict(m.params)
  newline = np.asarray(params.pop("image_newline"))
  out = export.tensors(dataclasses.replace(m, params=params))
  out[NEWLINE[export.LAYOUT]] = export._to_torch(newline)
  return out
