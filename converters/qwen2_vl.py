"""Name tables for Qwen2-VL (`model_type` "qwen2_vl") and Qwen2.5-VL ("qwen2_5_vl").

Two key layouts, told apart by the patch-embedding name present (`LAYOUTS`): "hub" is what the
real checkpoints hold and also what transformers 5 `save_pretrained` writes (model.layers...,
visual..., lm_head); "module" is transformers 5's module names (model.language_model...,
model.visual...), e.g. `model.state_dict()` or a `torch.save` of it.
"""

from jaxmm.converters.common import Plan, Rule
from jaxmm.converters.llava import DOWN, O, Q, UP, _linear, _tied_head, llama_rules
from jaxmm.config import Qwen2Config, Qwen2VLConfig, Qwen2VLVisionConfig
from jaxmm.errors import ConversionError

# Key prefixes per layout: (vision tower, decoder body, lm_head weight).
LAYOUTS = {"hub": ("visual.", "model.", "lm_head.weight"),
           "module": ("model.visual.", "model.language_model.", "lm_head.weight")}
# Buffers some checkpoints carry that the config determines.
_IGNORE = (r"rotary_emb\.inv_freq$", r"rotary_pos_emb\.inv_freq$")


def _norm(src: str, dst: str, d: int, bias: bool, layers=None) -> list[Rule]:
  rules = [Rule(f"{src}.weight", f"{dst}/scale", (d,), "id", layers, ("embed",))]
  return rules + ([Rule(f"{src}.bias", f"{dst}/bias", (d,), "id", layers, ("embed",))]
                  if bias else [])


def qwen2_rules(cfg: Qwen2Config, body: str, head: str, dst: str = "llm/",
                embed: str | None = None) -> list[Rule]:
  """The Qwen2 decoder: LLaMA's names and table, biases on q/k/v only (`Qwen2Config`)."""
  return llama_rules(cfg, body, head, dst, embed)


def _mlp_rules(cfg: Qwen2VLVisionConfig, lay: str, out: str) -> list[Rule]:
  e, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.depth
  if cfg.variant == "qwen2_vl":
    return [*_linear(f"{lay}mlp.fc1", f"{out}mlp/fc1", e, f, True, n, axes=UP),
            *_linear(f"{lay}mlp.fc2", f"{out}mlp/fc2", f, e, True, n, axes=DOWN)]
  return [*_linear(f"{lay}mlp.gate_proj", f"{out}mlp/gate", e, f, True, n, axes=UP),
          *_linear(f"{lay}mlp.up_proj", f"{out}mlp/up", e, f, True, n, axes=UP),
          *_linear(f"{lay}mlp.down_proj", f"{out}mlp/down", f, e, True, n, axes=DOWN)]


def vision_rules(cfg: Qwen2VLVisionConfig, prefix: str, dst: str = "vision/") -> list[Rule]:
  """The vision tower: Conv3d patch embedding, the blocks, the 2x2 merger."""
  e, n, ln = cfg.hidden_size, cfg.depth, cfg.variant == "qwen2_vl"
  p, u = cfg.patch_size, cfg.merge_unit * cfg.hidden_size
  lay, out = f"{prefix}blocks.{{i}}.", f"{dst}blocks/"
  return [
      Rule(f"{prefix}patch_embed.proj.weight", f"{dst}patch_embed/kernel",
           (e, cfg.in_channels, cfg.temporal_patch_size, p, p), "conv3d",
           axes=(None, None, None, None, "embed")),
      *_norm(f"{lay}norm1", f"{out}norm1", e, ln, n),
      *_linear(f"{lay}attn.qkv", f"{out}qkv", e, 3 * e, True, n, axes=Q),
      *_linear(f"{lay}attn.proj", f"{out}proj", e, e, True, n, axes=O),
      *_norm(f"{lay}norm2", f"{out}norm2", e, ln, n),
      *_mlp_rules(cfg, lay, out),
      *_norm(f"{prefix}merger.ln_q", f"{dst}merger/ln_q", e, ln),
      *_linear(f"{prefix}merger.mlp.0", f"{dst}merger/mlp/fc1", u, u, True, axes=UP),
      *_linear(f"{prefix}merger.mlp.2", f"{dst}merger/mlp/fc2", u, cfg.out_hidden_size, True,
               axes=DOWN),
  ]


def qwen2_vl_rules(cfg: Qwen2VLConfig, layout: str = "hub", embed: str | None = None) -> list[Rule]:
  """The whole table for one of `LAYOUTS` (`embed`: a tied checkpoint's embedding source)."""
  vision, body, head = LAYOUTS[layout]
  return [*vision_rules(cfg.vision, vision), *qwen2_rules(cfg.text, body, head, embed=embed)]


def detect_layout(names) -> str:
  """The layout whose patch-embedding name is present."""
  names = set(names)
  found = [k for k, (v, *_) in LAYOUTS.items() if f"{v}patch_embed.proj.weight" in names]
  if len(found) != 1:
    raise ConversionError("cannot tell the Qwen2-VL key layout: expected exactly one of "
                          + ", ".join(f"{v}patch_embed.proj.weight" for v, *_ in LAYOUTS.values()))
  return found[0]


def plan(hf_config: dict, names) -> Plan:
  """Config + rules for a `model_type` qwen2_vl / qwen2_5_vl checkpoint holding `names`."""
  cfg = Qwen2VLConfig.from_hf(hf_config)
  layout = detect_layout(names)
  _, body, head = LAYOUTS[layout]
  embed, head_ignore = _tied_head(cfg.text.tie_word_embeddings, names, body, head)
  return Plan("qwen2_vl", cfg, qwen2_vl_rules(cfg, layout, embed), _IGNORE + head_ignore)


# ---- export (jaxmm -> transformers folder) ---------------------------------------------------

def hf_config(cfg: Qwen2VLConfig):
  """transformers' Qwen2VLConfig / Qwen2_5_VLConfig with every field that changes the math."""
  from transformers import Qwen2_5_VLConfig, Qwen2VLConfig
  v, t = cfg.vision, cfg.text
  eos = list(t.eos_token_ids)
  text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
              num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
              rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
              rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                               "mrope_section": list(t.mrope_section)},
              bos_token_id=t.bos_token_id, pad_token_id=t.pad_token_id,
              eos_token_id=eos[0] if len(eos) == 1 else (eos or None))
  vision = dict(depth=v.depth, num_heads=v.num_heads, hidden_act=v.hidden_act,
                in_channels=v.in_channels, patch_size=v.patch_size,
                temporal_patch_size=v.temporal_patch_size,
                spatial_merge_size=v.spatial_merge_size,
                rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
  if cfg.model_type == "qwen2_vl":
    if v.intermediate_size % v.hidden_size:
      raise ConversionError(f"Qwen2-VL's MLP width is embed_dim * mlp_ratio (an integer): "
                            f"{v.intermediate_size} is not a multiple of {v.hidden_size}")
    vision.update(embed_dim=v.hidden_size, hidden_size=v.out_hidden_size,
                  mlp_ratio=v.intermediate_size // v.hidden_size)
    cls = Qwen2VLConfig
  else:
    vision.update(hidden_size=v.hidden_size, out_hidden_size=v.out_hidden_size,
                  intermediate_size=v.intermediate_size, window_size=v.window_size,
                  fullatt_block_indexes=list(v.fullatt_block_indexes),
                  tokens_per_second=v.tokens_per_second)
    cls = Qwen2_5_VLConfig
  return cls(text_config=text, vision_config=vision, image_token_id=cfg.image_token_id,
             video_token_id=cfg.video_token_id, vision_start_token_id=cfg.vision_start_token_id,
             vision_end_token_id=cfg.vision_end_token_id,
             tie_word_embeddings=t.tie_word_embeddings)


def tensors(m) -> dict:
  """{tensor name: torch tensor} of a loaded Qwen2-VL / Qwen2.5-VL `jaxmm.Model`, in the layout
  `save_pretrained` writes (the hub's)."""
  import numpy as np
  from jaxmm.converters import common
  from jaxmm.converters.export import _to_torch
  params = common.unflatten({k: np.asarray(v) for k, v in common.flatten(m.params).items()})
  out = common.export(params, qwen2_vl_rules(m.config, "hub"))
  return {k: _to_torch(v) for k, v in out.items()}
