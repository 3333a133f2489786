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
    known = {"vision_config", "text_config", "image_token_index", "image_token_id",
             "image_seq_length", "projector_hidden_act", "vision_feature_select_strategy",
             "vision_feature_layer", "multimodal_projector_bias", "tie_word_embeddings",
             "pad_token_id", "ignore_index", "vocab_size"}
    check_keys("llava", d, known)
    vd = d["vision_config"]
    require("llava", "vision_config.model_type", vd.get("model_type", "clip_vision_model"),
            ("clip_vision_model",))
    td = d["text_config"]
    require("llava", "text_config.model_type", td.get("model_type", "llama"), ("llama",))
    require("llava", "projector_hidden_act", d.get("projector_hidden_act", "gelu"), ("gelu",))
    strategy = d.get("vision_feature_select_strategy", "default")
    require("llava", "vision_feature_select_strategy", strategy, ("default", "full"))
    fl = d.get("vision_feature_layer", -2)
    return cls(vision=ClipVisionConfig.from_hf(vd), text=LlamaConfig.from_hf(td),
               image_token_id=d.get("image_token_id", d.get("image_token_index", 32000)),
               vision_feature_layer=tuple(fl) if isinstance(fl, list) else fl,
               vision_feature_select_strategy=strategy,
               multimodal_projector_bias=bool(d.get("multimodal_projector_bias", True)))


_SUBCONFIGS = {("LlavaConfig", "vision"): ClipVisionConfig, ("LlavaConfig", "text"): LlamaConfig}


# ---- presets ----------------------------------------------------------------------------------

def llava15_7b() -> LlavaConfig:
  """LLaVA-1.5-7B: CLIP ViT-L/14-336, Vicuna-7B."""
  return LlavaConfig(text=LlamaConfig(vocab_size=32064))


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
