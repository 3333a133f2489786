"""Export a jaxmm LLaVA as a transformers folder: `jaxmm export MODEL HF_OUT [--overwrite]`.

The inverse of `jaxmm convert`: HF_OUT holds config.json (a transformers `LlavaConfig` built from
the jaxmm config), model.safetensors (in the key layout transformers 5 `save_pretrained` writes,
through the same name tables `convert` reads) and the tokenizer/processor files of MODEL, so
`LlavaForConditionalGeneration.from_pretrained(HF_OUT)` and `AutoProcessor` load it as is.
"""
import argparse
import shutil
from pathlib import Path

import numpy as np

import jaxmm.cli
from jaxmm.converters import common
from jaxmm.converters import llava as llava_conv
from jaxmm.converters.cli import AUX_FILES
from jaxmm import api, checkpoint
from jaxmm.config import LlamaConfig, LlavaConfig
from jaxmm.errors import ConversionError

LAYOUT = "hf"


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("model", help="jaxmm LLaVA folder (from `jaxmm convert` or `jaxmm train vlm`)")
  p.add_argument("hf_out", help="output Hugging Face folder")
  p.add_argument("--overwrite", action="store_true", help="replace HF_OUT if it exists")


def _rope(t: LlamaConfig) -> dict:
  rp = {"rope_type": t.rope_type, "rope_theta": t.rope_theta}
  if t.rope_type in ("linear", "llama3"):
    rp["factor"] = t.rope_factor
  if t.rope_type == "llama3":
    rp.update(low_freq_factor=t.rope_low_freq_factor, high_freq_factor=t.rope_high_freq_factor,
              original_max_position_embeddings=t.rope_original_max_positions)
  return rp


def hf_config(cfg: LlavaConfig):
  """transformers' LlavaConfig with every field that changes the math taken from `cfg`."""
  from transformers import CLIPVisionConfig, LlamaConfig as HFLlama, LlavaConfig as HFLlava
  v, t = cfg.vision, cfg.text
  eos = list(t.eos_token_ids)
  vc = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                        num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                        num_channels=v.num_channels, image_size=v.image_size,
                        patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                        hidden_act=v.hidden_act)
  tc = HFLlama(vocab_size=t.vocab_size, hidden_size=t.hidden_size,
               intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
               num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
               head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_parameters=_rope(t),
               max_position_embeddings=t.max_position_embeddings,
               tie_word_embeddings=t.tie_word_embeddings, attention_bias=t.attention_bias,
               mlp_bias=t.mlp_bias, bos_token_id=t.bos_token_id, pad_token_id=t.pad_token_id,
               eos_token_id=eos[0] if len(eos) == 1 else (eos or None))
  fl = cfg.vision_feature_layer
  return HFLlava(vision_config=vc, text_config=tc, image_token_index=cfg.image_token_id,
                 projector_hidden_act=cfg.projector_hidden_act,
                 vision_feature_layer=list(fl) if isinstance(fl, tuple) else fl,
                 vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                 multimodal_projector_bias=cfg.multimodal_projector_bias,
                 tie_word_embeddings=t.tie_word_embeddings)


def _to_torch(x: np.ndarray):
  """A torch tensor of the same dtype (bfloat16 arrays are reinterpreted bit for bit)."""
  import torch
  x = np.ascontiguousarray(x)
  if x.dtype.name == "bfloat16":
    return torch.from_numpy(x.view(np.uint16)).view(torch.bfloat16)
  return torch.from_numpy(x)


def tensors(m: api.Model) -> dict:
  """{transformers tensor name: torch tensor} of a loaded LLaVA model."""
  params = common.unflatten({k: np.asarray(v) for k, v in common.flatten(m.params).items()})
  out = common.export(params, llava_conv.llava_rules(m.config, LAYOUT))
  # CLIP's post-LayerNorm is part of transformers' vision tower but not of LLaVA's math (it reads
  # hidden states before it); an identity norm keeps the folder complete.
  d = m.config.vision.hidden_size
  post = f"{llava_conv.LAYOUTS[LAYOUT][0]}post_layernorm."
  dt = np.asarray(out[f"{post.replace('post_layernorm.', 'pre_layrnorm.')}weight"]).dtype
  out[post + "weight"], out[post + "bias"] = np.ones(d, dt), np.zeros(d, dt)
  return {k: _to_torch(v) for k, v in out.items()}


def _exporter(m: api.Model):
  """(hf_config, tensors) functions of the model's family (LLaVA-NeXT: `converters.llava_next`)."""
  if m.family == "llava_next":
    from jaxmm.converters import llava_next
    return llava_next.hf_config, llava_next.tensors
  if m.family == "qwen2_vl":
    from jaxmm.converters import qwen2_vl
    return qwen2_vl.hf_config, qwen2_vl.tensors
  if m.family != "llava":
    raise ConversionError(f"jaxmm export writes LLaVA models (llava, llava_next) and qwen2_vl; "
                          f"{m.path} holds {m.family!r}")
  return hf_config, tensors


def export_folder(model, hf_out, overwrite: bool = False) -> Path:
  """Writes HF_OUT atomically from the jaxmm LLaVA folder (or loaded `jaxmm.Model`) `model`."""
  from safetensors.torch import save_file
  m = model if isinstance(model, api.Model) else api.load(model)
  to_config, to_tensors = _exporter(m)
  cfg = to_config(m.config)
  cfg.dtype = m.config.text.dtype
  with checkpoint.atomic_dir(hf_out, overwrite) as tmp:
    save_file(to_tensors(m), tmp / "model.safetensors", metadata={"format": "pt"})
    cfg.save_pretrained(tmp)
    for name in AUX_FILES:
      if m.path is not None and (Path(m.path) / name).is_file():
        shutil.copy2(Path(m.path) / name, tmp / name)
  return Path(hf_out)


def run(args) -> int:
  out = export_folder(args.model, args.hf_out, args.overwrite)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
