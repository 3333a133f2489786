"""Frozen model configs, one dataclass per family, with presets and strict `from_hf`.

`from_hf(config_dict)` maps a Hugging Face `config.json` onto our fields. Keys that only matter to
training or to transformers' own bookkeeping are listed as ignorable; any other key is an error,
so a checkpoint whose math we do not implement can never load silently.
"""
import dataclasses
from typing import Any

from jaxmm.errors import ConfigError

# Keys every transformers config carries that do not change the forward math at inference.
_HF_BOOKKEEPING = frozenset({
    "transformers_version", "architectures", "output_hidden_states", "return_dict", "dtype",
    "torch_dtype", "chunk_size_feed_forward", "is_encoder_decoder", "id2label", "label2id",
    "problem_type", "initializer_range", "initializer_factor", "use_cache", "_name_or_path",
    "model_type", "output_attentions", "attention_dropout", "dropout", "tokenizer_class",
    "prefix", "task_specific_params", "finetuning_task", "pretraining_tp", "_attn_implementation",
    "add_cross_attention", "tie_encoder_decoder", "pruned_heads", "torchscript",
    "use_bfloat16", "cross_attention_hidden_size", "decoder_start_token_id", "sep_token_id",
    "max_length", "min_length", "do_sample", "num_beams", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate",
    "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "early_stopping",
    "diversity_penalty", "num_beam_groups", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "tf_legacy_loss", "is_decoder", "embedding_size", "_model_name_or_path", "unk_token_id",
})


def check_keys(family: str, d: dict, known: set) -> None:
  """Raises ConfigError naming every key that is neither known nor bookkeeping."""
  unknown = sorted(set(d) - set(known) - _HF_BOOKKEEPING)
  if unknown:
    raise ConfigError(f"{family} config: unsupported key(s) {unknown}; they may change the math "
                      "and jaxmm does not implement them")


def require(family: str, key: str, value, allowed) -> None:
  if value not in allowed:
    raise ConfigError(f"{family} config: {key}={value!r} is not supported (supported: {allowed})")


class Serializable:
  """to_dict/from_dict for (nested) frozen dataclasses; tuples survive the JSON round trip and
  an unknown field is an error (a model folder written by another version, or edited by hand)."""

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict):
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ConfigError(f"{cls.__module__}.{cls.__name__}: unknown field(s) {unknown}")
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name not in d:
        continue
      v = d[f.name]
      sub = _SUBCONFIGS.get((cls.__name__, f.name))
      kw[f.name] = sub.from_dict(v) if sub else (tuple(v) if isinstance(v, list) else v)
    return cls(**kw)


@dataclasses.dataclass(frozen=True)
class LlamaConfig(Serializable):
  """LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, MHA/GQA."""
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"          # default | linear | llama3
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_positions: int = 8192
  max_position_embeddings: int = 4096
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  bos_token_id: int | None = 1
  eos_token_ids: tuple = (2,)
  pad_token_id: int | None = None
  dtype: str = "float32"              # activation / compute dtype
  attention: str = "xla"              # the kernel: jaxmm.layers.attention.IMPLEMENTATIONS

  @property
  def o_bias(self) -> bool:
    return self.attention_bias

  @classmethod
  def from_hf(cls, d: dict) -> "LlamaConfig":
    known = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
             "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
             "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id",
             "pad_token_id", "hidden_act"}
    check_keys("llama", d, known)
    require("llama", "hidden_act", d.get("hidden_act", "silu"), ("silu",))
    heads = d["num_attention_heads"]
    eos = d.get("eos_token_id", 2)
    return cls(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)),
        bos_token_id=d.get("bos_token_id"), pad_token_id=d.get("pad_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ()),
        **_rope_fields(d))


def _rope_fields(d: dict) -> dict:
  """Reads RoPE settings from transformers-5 `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
  rp = dict(d.get("rope_parameters") or {})
  if not rp:
    rp = dict(d.get("rope_scaling") or {})
    rp.setdefault("rope_theta", d.get("rope_theta", 10000.0))
  rope_type = rp.pop("rope_type", rp.pop("type", "default"))
  require("llama", "rope_type", rope_type, ("default", "linear", "llama3"))
  if rp.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError("llama config: partial_rotary_factor != 1 is not supported")
  allowed = {"default": {"rope_theta", "partial_rotary_factor"},
             "linear": {"rope_theta", "factor", "partial_rotary_factor"},
             "llama3": {"rope_theta", "factor", "low_freq_factor", "high_freq_factor",
                        "original_max_position_embeddings", "partial_rotary_factor"}}[rope_type]
  extra = sorted(set(rp) - allowed)
  if extra:
    raise ConfigError(f"llama config: rope_parameters key(s) {extra} not supported for {rope_type}")
  out = {"rope_type": rope_type, "rope_theta": float(rp.get("rope_theta", 10000.0)),
         "rope_factor": float(rp.get("factor", 1.0))}
  if rope_type == "llama3":
    out.update(rope_low_freq_factor=float(rp["low_freq_factor"]),
               rope_high_freq_factor=float(rp["high_freq_factor"]),
               rope_original_max_positions=int(rp["original_max_position_embeddings"]))
  return out


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig(Serializable):
  """CLIP ViT vision tower (pre-LN, class token, learned positions)."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_layers: int = 24
  num_heads: int = 16
  num_channels: int = 3
  image_size: int = 336
  patch_size: int = 14
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf(cls, d: dict) -> "ClipVisionConfig":
    known = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_channels", "image_size", "patch_size", "layer_norm_eps", "hidden_act",
             "projection_dim", "vocab_size"}  # projection_dim/vocab_size: CLIP heads LLaVA never uses
    check_keys("clip_vision_model", d, known)
    act = d.get("hidden_act", "quick_gelu")
    require("clip_vision_model", "hidden_act", act, ("quick_gelu", "gelu", "gelu_pytorch_tanh"))
    return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
               num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
               num_channels=d.get("num_channels", 3), image_size=d["image_size"],
               patch_size=d["patch_size"], layer_norm_eps=d.get("layer_norm_eps", 1e-5),
               hidden_act=act)


@dataclasses.dataclass(frozen=True)
class LlavaConfig(Serializable):
  """LLaVA-1.5: CLIP ViT -> 2-layer MLP projector -> LLaMA decoder."""
  vision: ClipVisionConfig = ClipVisionConfig()
  text: LlamaConfig = LlamaConfig()
  image_token_id: int = 32000
  projector_hidden_act: str = "gelu"
  vision_feature_layer: Any = -2       # int, or a tuple of ints (features concatenated)
  vision_feature_select_strategy: str = "default"   # default (drop CLS) | full
  multimodal_projector_bias: bool = True

  @property
  def num_image_tokens(self) -> int:
    return self.vision.num_patches + (self.vision_feature_select_strategy == "full")

  @property
  def feature_layers(self) -> tuple:
    fl = self.vision_feature_layer
    return tuple(fl) if isinstance(fl, (list, tuple)) else (fl,)

  @classmethod
  def from_hf(cls, d: dict) -> "LlavaConfig":
    check_keys("llava", d, _LLAVA_KEYS)
    return cls(**_llava_fields("llava", d))


# The config.json keys LLaVA-1.5 and LLaVA-NeXT share, and how they read them.
_LLAVA_KEYS = frozenset({
    "vision_config", "text_config", "image_token_index", "image_token_id", "image_seq_length",
    "projector_hidden_act", "vision_feature_select_strategy", "vision_feature_layer",
    "multimodal_projector_bias", "tie_word_embeddings", "pad_token_id", "ignore_index",
    "vocab_size"})


def _llava_fields(family: str, d: dict) -> dict:
  """The LlavaConfig fields of a LLaVA-style config.json (keys already checked)."""
  vd = d["vision_config"]
  require(family, "vision_config.model_type", vd.get("model_type", "clip_vision_model"),
          ("clip_vision_model",))
  td = d["text_config"]
  require(family, "text_config.model_type", td.get("model_type", "llama"), ("llama",))
  require(family, "projector_hidden_act", d.get("projector_hidden_act", "gelu"), ("gelu",))
  strategy = d.get("vision_feature_select_strategy", "default")
  require(family, "vision_feature_select_strategy", strategy, ("default", "full"))
  fl = d.get("vision_feature_layer", -2)
  return dict(vision=ClipVisionConfig.from_hf(vd), text=LlamaConfig.from_hf(td),
              image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
              vision_feature_layer=tuple(fl) if isinstance(fl, list) else fl,
              vision_feature_select_strategy=strategy,
              multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)))


# transformers' LlamaConfig defaults for the keys a sparse hub `text_config` leaves out (the
# llava-hf/llava-v1.6-vicuna-* config.json names only its vocabulary, norm eps and padding).
_HF_LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                      "num_hidden_layers": 32, "num_attention_heads": 32,
                      "max_position_embeddings": 2048, "bos_token_id": 1, "eos_token_id": 2}
_ANYRES_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@dataclasses.dataclass(frozen=True)
class LlavaNextConfig(Serializable):
  """LLaVA-NeXT (LLaVA-1.6): LLaVA-1.5's CLIP ViT, projector and LLaMA decoder, plus anyres
  (a base image and tiles at the best of `image_grid_pinpoints`, spatially unpadded, with a
  learned newline embedding after each feature row)."""
  vision: ClipVisionConfig = ClipVisionConfig()
  text: LlamaConfig = LlamaConfig()
  image_token_id: int = 32000
  projector_hidden_act: str = "gelu"
  vision_feature_layer: Any = -2       # int, or a tuple of ints (features concatenated)
  vision_feature_select_strategy: str = "default"   # "full" cannot run anyres (see below)
  multimodal_projector_bias: bool = True
  image_grid_pinpoints: tuple = _ANYRES_PINPOINTS    # ((height, width), ...) in pixels

  def __post_init__(self):
    pins = tuple(tuple(int(x) for x in p) for p in self.image_grid_pinpoints)
    object.__setattr__(self, "image_grid_pinpoints", pins)   # hashable after a JSON round trip
    s = self.vision.image_size
    bad = [list(p) for p in pins if len(p) != 2 or min(p) <= 0 or p[0] % s or p[1] % s]
    if not pins or bad:
      raise ConfigError(f"llava_next config: image_grid_pinpoints must be (height, width) pairs "
                        f"that are multiples of the vision image_size {s}; got {bad or 'none'}")
    if self.vision_feature_select_strategy != "default":
      raise ConfigError("llava_next config: vision_feature_select_strategy="
                        f"{self.vision_feature_select_strategy!r} is not supported: with a CLS "
                        "token the tiles do not fold into a feature grid (transformers' "
                        "LlavaNextModel fails on it too); use 'default'")

  @property
  def feature_layers(self) -> tuple:
    fl = self.vision_feature_layer
    return tuple(fl) if isinstance(fl, (list, tuple)) else (fl,)

  @classmethod
  def from_hf(cls, d: dict) -> "LlavaNextConfig":
    """A `model_type: llava_next` config.json (the transformers-5 or the sparse hub form)."""
    check_keys("llava_next", d, _LLAVA_KEYS | {"image_grid_pinpoints",
                                               "use_image_newline_parameter"})
    require("llava_next", "use_image_newline_parameter",
            d.get("use_image_newline_parameter", True), (True,))
    d = {**d, "text_config": {**_HF_LLAMA_DEFAULTS, **d["text_config"]}}
    return cls(**_llava_fields("llava_next", d),
               image_grid_pinpoints=d.get("image_grid_pinpoints") or _ANYRES_PINPOINTS)


_SUBCONFIGS = {("LlavaConfig", "vision"): ClipVisionConfig, ("LlavaConfig", "text"): LlamaConfig,
               ("LlavaNextConfig", "vision"): ClipVisionConfig,
               ("LlavaNextConfig", "text"): LlamaConfig}


# ---- Qwen2-VL / Qwen2.5-VL --------------------------------------------------------------------

# config.json keys of the Qwen2 language model (nested `text_config` in transformers 5, at the
# top level in the hub's flat config.json).
_QWEN2_TEXT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "rope_parameters",
    "rope_scaling", "rope_theta", "bos_token_id", "eos_token_id", "pad_token_id",
    "tie_word_embeddings"})
# Top-level keys of a Qwen2-VL / Qwen2.5-VL config.json besides the language model's.
_QWEN_VL_KEYS = frozenset({
    "vision_config", "text_config", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "vision_token_id", "tie_word_embeddings", "pad_token_id"})
QWEN_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


@dataclasses.dataclass(frozen=True)
class Qwen2Config(Serializable):
  """The Qwen2 decoder of Qwen2-VL / Qwen2.5-VL: LLaMA with q/k/v biases (none on o) and
  M-RoPE (`mrope_section` splits the head_dim/2 frequencies over the t, h, w position axes)."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_layers: int = 28
  num_heads: int = 28
  num_kv_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple = (16, 24, 24)
  max_position_embeddings: int = 32768
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 151643
  eos_token_ids: tuple = (151645,)
  pad_token_id: int | None = None
  dtype: str = "float32"              # activation / compute dtype
  attention: str = "xla"              # the kernel: jaxmm.layers.attention.IMPLEMENTATIONS

  def __post_init__(self):
    object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
    if self.hidden_size % self.num_heads or sum(self.mrope_section) * 2 != self.head_dim:
      raise ConfigError(f"qwen2 config: mrope_section {list(self.mrope_section)} must sum to "
                        f"head_dim/2 = {self.hidden_size // self.num_heads // 2}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads   # transformers' Qwen2-VL ignores a head_dim key

  # The LLaMA layer's bias switches (`llama.DecoderLayer` runs Qwen2's layers too).
  attention_bias = property(lambda self: True)    # q, k, v
  o_bias = property(lambda self: False)
  mlp_bias = property(lambda self: False)

  @classmethod
  def from_hf(cls, d: dict, tie: bool = False) -> "Qwen2Config":
    """The language model of a config.json (`d`: its keys, already split from the VL ones)."""
    check_keys("qwen2_vl text", d, _QWEN2_TEXT_KEYS)
    require("qwen2_vl text", "hidden_act", d.get("hidden_act", "silu"), ("silu",))
    require("qwen2_vl text", "use_sliding_window", bool(d.get("use_sliding_window")), (False,))
    kinds = sorted(set(d.get("layer_types") or ["full_attention"]))
    require("qwen2_vl text", "layer_types", kinds, (["full_attention"],))
    heads, eos = d["num_attention_heads"], d.get("eos_token_id", 151645)
    if d.get("head_dim") not in (None, d["hidden_size"] // heads):
      raise ConfigError(f"qwen2_vl text config: head_dim={d['head_dim']} != hidden_size / "
                        f"num_attention_heads = {d['hidden_size'] // heads}")
    return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
               intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
               num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
               rms_norm_eps=d.get("rms_norm_eps", 1e-6),
               max_position_embeddings=d.get("max_position_embeddings", 32768),
               tie_word_embeddings=bool(tie or d.get("tie_word_embeddings", False)),
               bos_token_id=d.get("bos_token_id"), pad_token_id=d.get("pad_token_id"),
               eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else
               ((eos,) if eos is not None else ()), **_mrope_fields(d))


def _mrope_fields(d: dict) -> dict:
  """rope_theta and mrope_section from transformers-5 `rope_parameters` or the hub's
  `rope_scaling` ({"type": "mrope", ...}) + `rope_theta`; any other rope type is an error."""
  rp = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  rope_type = rp.pop("rope_type", rp.pop("type", "default"))
  if rope_type not in ("default", "mrope"):
    raise ConfigError(f"qwen2_vl config: unknown rope type {rope_type!r} (supported: "
                      "default/mrope with mrope_section)")
  extra = sorted(set(rp) - {"rope_theta", "mrope_section"})
  if extra:
    raise ConfigError(f"qwen2_vl config: rope_parameters key(s) {extra} are not supported")
  return {"rope_theta": float(rp.get("rope_theta", d.get("rope_theta", 1000000.0))),
          "mrope_section": tuple(rp.get("mrope_section", (16, 24, 24)))}


@dataclasses.dataclass(frozen=True)
class Qwen2VLVisionConfig(Serializable):
  """The Qwen2-VL / Qwen2.5-VL vision tower. variant "qwen2_vl": LayerNorm blocks, a
  quick-GELU MLP, full attention per image; "qwen2_5_vl": RMSNorm blocks, a SwiGLU MLP,
  window attention (`window_size` pixels) except at `fullatt_block_indexes`. Both: a linear
  patch embedding over [C * temporal_patch_size * patch_size^2] patches, 2-D rotary, a 2x2
  patch merger (LayerNorm / RMSNorm + GELU MLP) to the decoder width `out_hidden_size`."""
  variant: str = "qwen2_vl"
  depth: int = 32
  hidden_size: int = 1280            # block width (transformers' Qwen2-VL `embed_dim`)
  intermediate_size: int = 5120
  num_heads: int = 16
  out_hidden_size: int = 3584        # merger output = decoder width
  hidden_act: str = "quick_gelu"
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  rope_theta: float = 10000.0
  window_size: int = 112
  fullatt_block_indexes: tuple = ()
  tokens_per_second: int = 4

  def __post_init__(self):
    object.__setattr__(self, "fullatt_block_indexes",
                       tuple(int(i) for i in self.fullatt_block_indexes))
    require("qwen2_vl vision", "variant", self.variant, QWEN_VL_MODEL_TYPES)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size ** 2

  @classmethod
  def from_hf(cls, d: dict, variant: str) -> "Qwen2VLVisionConfig":
    v2 = variant == "qwen2_vl"
    known = {"depth", "hidden_size", "num_heads", "in_channels", "in_chans", "patch_size",
             "spatial_patch_size", "spatial_merge_size", "temporal_patch_size", "hidden_act",
             "rope_parameters", "num_hidden_layers", "num_attention_heads"}
    known |= {"embed_dim", "mlp_ratio"} if v2 else {
        "intermediate_size", "out_hidden_size", "window_size", "fullatt_block_indexes",
        "tokens_per_second"}
    check_keys(f"{variant} vision", d, known)
    p = d.get("patch_size", 14)
    if d.get("spatial_patch_size", p) != p:
      raise ConfigError(f"{variant} vision config: spatial_patch_size != patch_size")
    rp = dict(d.get("rope_parameters") or {"rope_type": "axial"})
    require(f"{variant} vision", "rope_type", rp.pop("rope_type", "axial"), ("axial",))
    act = d.get("hidden_act", "quick_gelu" if v2 else "silu")
    require(f"{variant} vision", "hidden_act", act, ("quick_gelu", "gelu") if v2 else ("silu",))
    width = d.get("embed_dim", 1280) if v2 else d.get("hidden_size", 1280)
    common = dict(
        variant=variant, depth=d.get("depth", d.get("num_hidden_layers", 32)), hidden_size=width,
        num_heads=d.get("num_heads", d.get("num_attention_heads", 16)), hidden_act=act,
        in_channels=d.get("in_channels", d.get("in_chans", 3)), patch_size=p,
        temporal_patch_size=d.get("temporal_patch_size", 2),
        spatial_merge_size=d.get("spatial_merge_size", 2),
        rope_theta=float(rp.get("rope_theta", 10000.0)))
    if v2:
      return cls(**common, intermediate_size=int(width * d.get("mlp_ratio", 4)),
                 out_hidden_size=d.get("hidden_size", 3584))
    return cls(**common, intermediate_size=d.get("intermediate_size", 3420),
               out_hidden_size=d.get("out_hidden_size", 3584),
               window_size=d.get("window_size", 112),
               fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", (7, 15, 23, 31))),
               tokens_per_second=d.get("tokens_per_second", 4))


@dataclasses.dataclass(frozen=True)
class Qwen2VLConfig(Serializable):
  """Qwen2-VL (model_type "qwen2_vl") or Qwen2.5-VL ("qwen2_5_vl"): the vision tower, whose
  merger writes visual tokens of the decoder width, and the Qwen2 decoder with M-RoPE."""
  vision: Qwen2VLVisionConfig = Qwen2VLVisionConfig()
  text: Qwen2Config = Qwen2Config()
  model_type: str = "qwen2_vl"
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653

  def __post_init__(self):
    require("qwen2_vl", "model_type", self.model_type, QWEN_VL_MODEL_TYPES)
    if self.vision.variant != self.model_type:
      raise ConfigError(f"qwen2_vl config: a {self.vision.variant} vision tower in a "
                        f"{self.model_type} model")
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ConfigError(f"{self.model_type} config: the vision merger writes "
                        f"{self.vision.out_hidden_size} features, the decoder width is "
                        f"{self.text.hidden_size}")

  @classmethod
  def from_hf(cls, d: dict) -> "Qwen2VLConfig":
    """A config.json in the transformers-5 form (nested text_config) or the hub's flat form."""
    model_type = d.get("model_type", "qwen2_vl")
    require("qwen2_vl", "model_type", model_type, QWEN_VL_MODEL_TYPES)
    text = d.get("text_config")
    if text is None:   # the flat hub form: the language model's keys at the top level
      text = {k: v for k, v in d.items() if k not in _QWEN_VL_KEYS or k == "pad_token_id"}
    else:
      check_keys(model_type, d, _QWEN_VL_KEYS)
    text = {k: v for k, v in text.items() if k != "model_type"}
    vision = {k: v for k, v in (d.get("vision_config") or {}).items() if k != "model_type"}
    return cls(vision=Qwen2VLVisionConfig.from_hf(vision, model_type),
               text=Qwen2Config.from_hf(text, tie=bool(d.get("tie_word_embeddings", False))),
               model_type=model_type, image_token_id=d.get("image_token_id", 151655),
               video_token_id=d.get("video_token_id", 151656),
               vision_start_token_id=d.get("vision_start_token_id", 151652),
               vision_end_token_id=d.get("vision_end_token_id", 151653))


_SUBCONFIGS.update({("Qwen2VLConfig", "vision"): Qwen2VLVisionConfig,
                    ("Qwen2VLConfig", "text"): Qwen2Config})


# ---- presets ----------------------------------------------------------------------------------

def llava15_7b() -> LlavaConfig:
  """LLaVA-1.5-7B: CLIP ViT-L/14-336, Vicuna-7B."""
  return LlavaConfig(text=LlamaConfig(vocab_size=32064))


def llava15_13b() -> LlavaConfig:
  """LLaVA-1.5-13B: CLIP ViT-L/14-336, Vicuna-13B (40 layers, width 5120, FFN 13824)."""
  return LlavaConfig(text=LlamaConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824,
                                      num_layers=40, num_heads=40, num_kv_heads=40))


def llava16_7b() -> LlavaNextConfig:
  """LLaVA-1.6-7B (llava-hf/llava-v1.6-vicuna-7b-hf): CLIP ViT-L/14-336, Vicuna-7B, the five
  anyres pinpoints up to 672x672 / 1008x336."""
  return LlavaNextConfig(text=LlamaConfig(vocab_size=32064, rms_norm_eps=1e-5, pad_token_id=0))


def smollm2_135m() -> LlamaConfig:
  """SmolLM2-135M-Instruct (30 layers, width 576, 9 heads / 3 KV heads, tied embeddings)."""
  return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
                     num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                     rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                     bos_token_id=1, eos_token_ids=(2,), pad_token_id=2)


def llava_bench() -> LlavaConfig:
  """The LLaVA-shaped benchmark config: 336 px / patch 14 (576 tokens), 6x256 CLIP, 8x512 LLaMA."""
  return LlavaConfig(
      vision=ClipVisionConfig(hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=8),
      text=LlamaConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_layers=8,
                       num_heads=8, num_kv_heads=8, head_dim=64))


def qwen2_vl_7b() -> Qwen2VLConfig:
  """Qwen2-VL-7B-Instruct: a 32-layer 1280-wide ViT (quick-GELU, MLP ratio 4), Qwen2-7B."""
  return Qwen2VLConfig(vision=Qwen2VLVisionConfig(), text=Qwen2Config())


def qwen25_vl_7b() -> Qwen2VLConfig:
  """Qwen2.5-VL-7B-Instruct: a 32-layer 1280-wide window-attention ViT (SwiGLU 3420, full
  attention at blocks 7/15/23/31), Qwen2.5-7B with 128k positions."""
  vision = Qwen2VLVisionConfig(variant="qwen2_5_vl", intermediate_size=3420, hidden_act="silu",
                               fullatt_block_indexes=(7, 15, 23, 31), tokens_per_second=2)
  return Qwen2VLConfig(vision=vision, text=Qwen2Config(max_position_embeddings=128000),
                       model_type="qwen2_5_vl")


def qwen25_vl_72b() -> Qwen2VLConfig:
  """Qwen2.5-VL-72B-Instruct: the ViT with SwiGLU 3456 and an 8192-wide merger, Qwen2.5-72B
  (80 layers, 64 heads / 8 KV heads, FFN 29568)."""
  vision = Qwen2VLVisionConfig(variant="qwen2_5_vl", intermediate_size=3456, hidden_act="silu",
                               out_hidden_size=8192, fullatt_block_indexes=(7, 15, 23, 31),
                               tokens_per_second=2)
  text = Qwen2Config(hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64,
                     num_kv_heads=8, max_position_embeddings=128000)
  return Qwen2VLConfig(vision=vision, text=text, model_type="qwen2_5_vl")
