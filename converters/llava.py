"""Name tables for LLaVA-1.5 (`model_type` "llava") and plain LLaMA decoders ("llama").

The tables are data: one `Rule` per tensor (per layer stack), built from the jaxmm config so
every shape is checked. LLaVA checkpoints come in three key layouts, told apart by the names
present (see `LAYOUTS`).
"""
import re

from jaxmm.converters.common import Plan, Rule
from jaxmm.config import ClipVisionConfig, LlamaConfig, LlavaConfig
from jaxmm.errors import ConversionError

# Key prefixes per LLaVA layout: (vision tower, projector, decoder body, lm_head weight).
LAYOUTS = {
    # What transformers 5 `save_pretrained` writes (it maps its module names back to these).
    "hf": ("vision_tower.", "multi_modal_projector.", "language_model.model.",
           "language_model.lm_head.weight"),
    # The older hub layout (llava-hf/llava-1.5-*): CLIPVisionModel kept its `vision_model`.
    "hub": ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
            "language_model.lm_head.weight"),
    # transformers 5 module names, e.g. a `torch.save(model.state_dict())` file.
    "module": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.",
               "lm_head.weight"),
}

# Tensors that are present in checkpoints but carry nothing jaxmm uses.
_ROTARY = r"\.rotary_emb\.inv_freq$"          # recomputed from the config
_CLIP_UNUSED = (r"post_layernorm\.(weight|bias)$",  # LLaVA reads hidden states before it
                r"embeddings\.position_ids$")        # a buffer: arange(num_positions)


def _linear(src: str, dst: str, d_in: int, d_out: int, bias: bool, layers=None, *,
            axes: tuple) -> list[Rule]:
  """A torch Linear [out, in] (+ bias) -> Flax Dense kernel [in, out] (+ bias); `axes`: the
  kernel's logical (in, out) axes."""
  rules = [Rule(f"{src}.weight", f"{dst}/kernel", (d_out, d_in), "T", layers, axes)]
  if bias:
    rules.append(Rule(f"{src}.bias", f"{dst}/bias", (d_out,), "id", layers, axes[1:]))
  return rules


def _layer_norm(src: str, dst: str, d: int, layers=None) -> list[Rule]:
  return [Rule(f"{src}.weight", f"{dst}/scale", (d,), "id", layers, ("embed",)),
          Rule(f"{src}.bias", f"{dst}/bias", (d,), "id", layers, ("embed",))]


# Logical (in, out) axes of the projections of a transformer block.
Q, KV, O = ("embed", "heads"), ("embed", "kv"), ("heads", "embed")
UP, DOWN = ("embed", "mlp"), ("mlp", "embed")


def llama_rules(cfg: LlamaConfig, body: str, head: str, dst: str = "",
                embed: str | None = None) -> list[Rule]:
  """The decoder: `body` prefixes embed_tokens/layers/norm, `head` is the lm_head weight name.
  `cfg`: a LlamaConfig or a config with its fields (Qwen2's: q/k/v biases, no o bias).

  `embed` overrides the embedding's source name (a tied checkpoint may store only the head).
  """
  d, f, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
  q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  lay, out = f"{body}layers.{{i}}.", f"{dst}layers/"
  ab, mb = cfg.attention_bias, cfg.mlp_bias
  rules = [
      Rule(embed or f"{body}embed_tokens.weight", f"{dst}embed", (cfg.vocab_size, d),
           axes=("vocab", "embed")),
      Rule(f"{lay}input_layernorm.weight", f"{out}attn_norm/scale", (d,), layers=n,
           axes=("embed",)),
      *_linear(f"{lay}self_attn.q_proj", f"{out}attn/q", d, q_dim, ab, n, axes=Q),
      *_linear(f"{lay}self_attn.k_proj", f"{out}attn/k", d, kv_dim, ab, n, axes=KV),
      *_linear(f"{lay}self_attn.v_proj", f"{out}attn/v", d, kv_dim, ab, n, axes=KV),
      *_linear(f"{lay}self_attn.o_proj", f"{out}attn/o", q_dim, d, cfg.o_bias, n, axes=O),
      Rule(f"{lay}post_attention_layernorm.weight", f"{out}mlp_norm/scale", (d,), layers=n,
           axes=("embed",)),
      *_linear(f"{lay}mlp.gate_proj", f"{out}mlp/gate", d, f, mb, n, axes=UP),
      *_linear(f"{lay}mlp.up_proj", f"{out}mlp/up", d, f, mb, n, axes=UP),
      *_linear(f"{lay}mlp.down_proj", f"{out}mlp/down", f, d, mb, n, axes=DOWN),
      Rule(f"{body}norm.weight", f"{dst}norm/scale", (d,), axes=("embed",)),
  ]
  if not cfg.tie_word_embeddings:
    rules.append(Rule(head, f"{dst}lm_head/kernel", (cfg.vocab_size, d), "T",
                      axes=("embed", "vocab")))
  return rules


def clip_rules(cfg: ClipVisionConfig, prefix: str, dst: str = "vision/") -> list[Rule]:
  """The CLIP ViT vision tower (without post_layernorm, which LLaVA does not use)."""
  d, f, n, p = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.patch_size
  lay, out = f"{prefix}encoder.layers.{{i}}.", f"{dst}layers/"
  return [
      Rule(f"{prefix}embeddings.patch_embedding.weight", f"{dst}patch_embed/kernel",
           (d, cfg.num_channels, p, p), "conv", axes=(None, None, None, "embed")),
      Rule(f"{prefix}embeddings.class_embedding", f"{dst}class_embed", (d,), axes=("embed",)),
      Rule(f"{prefix}embeddings.position_embedding.weight", f"{dst}pos_embed",
           (cfg.num_patches + 1, d), axes=(None, "embed")),
      *_layer_norm(f"{prefix}pre_layrnorm", f"{dst}pre_ln", d),
      *_layer_norm(f"{lay}layer_norm1", f"{out}ln1", d, n),
      *_linear(f"{lay}self_attn.q_proj", f"{out}attn/q", d, d, True, n, axes=Q),
      *_linear(f"{lay}self_attn.k_proj", f"{out}attn/k", d, d, True, n, axes=Q),
      *_linear(f"{lay}self_attn.v_proj", f"{out}attn/v", d, d, True, n, axes=Q),
      *_linear(f"{lay}self_attn.out_proj", f"{out}attn/o", d, d, True, n, axes=O),
      *_layer_norm(f"{lay}layer_norm2", f"{out}ln2", d, n),
      *_linear(f"{lay}mlp.fc1", f"{out}mlp/fc1", d, f, True, n, axes=UP),
      *_linear(f"{lay}mlp.fc2", f"{out}mlp/fc2", f, d, True, n, axes=DOWN),
  ]


def llava_rules(cfg: LlavaConfig, layout: str = "hf", embed: str | None = None) -> list[Rule]:
  """The whole LLaVA table for one of `LAYOUTS` (`embed`: see `llama_rules`)."""
  vision, proj, body, head = LAYOUTS[layout]
  d_in, d = cfg.vision.hidden_size * len(cfg.feature_layers), cfg.text.hidden_size
  bias = cfg.multimodal_projector_bias
  return [*clip_rules(cfg.vision, vision),
          *_linear(f"{proj}linear_1", "projector/fc1", d_in, d, bias, axes=UP),
          *_linear(f"{proj}linear_2", "projector/fc2", d, d, bias, axes=DOWN),
          *llama_rules(cfg.text, body, head, dst="llm/", embed=embed)]


def detect_layout(names) -> str:
  """The LLaVA layout whose class-embedding name is present."""
  names = set(names)
  found = [k for k, (vision, *_) in LAYOUTS.items()
           if f"{vision}embeddings.class_embedding" in names]
  if len(found) != 1:
    raise ConversionError("cannot tell the LLaVA key layout: expected exactly one of "
                          + ", ".join(f"{v}embeddings.class_embedding" for v, *_ in LAYOUTS.values()))
  return found[0]


def _tied_head(tied: bool, names, body: str, head: str) -> tuple[str | None, tuple[str, ...]]:
  """(embedding source override, ignores) for the head of a decoder.

  A tied checkpoint may store the shared matrix under the embedding name, the head name, or
  both (safetensors' `save_model` keeps only `lm_head.weight`): read whichever is there.
  """
  if not tied:
    return None, ()
  names = set(names)
  if f"{body}embed_tokens.weight" not in names and head in names:
    return head, ()
  return None, ("^" + re.escape(head) + "$",)


def _ignore(clip_prefix: str | None = None) -> tuple[str, ...]:
  """Regexes of the tensors dropped silently."""
  ignore = [_ROTARY]
  if clip_prefix is not None:
    ignore += ["^" + re.escape(clip_prefix) + p for p in _CLIP_UNUSED]
  return tuple(ignore)


def plan_llava(hf_config: dict, names) -> Plan:
  """Config + rules for a `model_type: llava` checkpoint holding tensors `names`."""
  cfg = LlavaConfig.from_hf(hf_config)
  layout = detect_layout(names)
  vision, _, body, head = LAYOUTS[layout]
  embed, head_ignore = _tied_head(cfg.text.tie_word_embeddings, names, body, head)
  return Plan("llava", cfg, llava_rules(cfg, layout, embed), _ignore(vision) + head_ignore)


def plan_llama(hf_config: dict, names) -> Plan:
  """Config + rules for a `model_type: llama` causal LM (names: model.layers.{i}..., lm_head)."""
  cfg = LlamaConfig.from_hf(hf_config)
  embed, head_ignore = _tied_head(cfg.tie_word_embeddings, names, "model.", "lm_head.weight")
  rules = llama_rules(cfg, "model.", "lm_head.weight", embed=embed)
  return Plan("llama", cfg, rules, _ignore() + head_ignore)
