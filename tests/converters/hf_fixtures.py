"""Tiny random Hugging Face checkpoints for the converter tests (built from configs, no download)."""
import json

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast)

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


# transformers-5 module names -> each file layout's names (a hand-written oracle of LAYOUTS).
_RENAMES = {
    "hf": [("model.vision_tower.", "vision_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."),
           ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")],
    "hub": [("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")],
    "module": [],
}


def layout_state_dict(model, layout: str) -> dict:
  out = {}
  for name, v in model.state_dict().items():
    for old, new in _RENAMES[layout]:
      if name.startswith(old):
        name = new + name[len(old):]
        break
    out[name] = v
  return out


def tiny_llama_config(gqa=True, tied=False, **kw) -> LlamaConfig:
  return LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2 if gqa else 4,
                     tie_word_embeddings=tied, **kw)


def tiny_llava(gqa=True, bias=True, feature_layer=-2, seed=0) -> LlavaForConditionalGeneration:
  torch.manual_seed(seed)
  vision = CLIPVisionConfig(hidden_size=12, intermediate_size=20, num_hidden_layers=3,
                            num_attention_heads=2, image_size=8, patch_size=4, projection_dim=6)
  cfg = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(gqa),
                    image_token_index=39, multimodal_projector_bias=bias,
                    vision_feature_layer=feature_layer)
  return _randomized(LlavaForConditionalGeneration(cfg).eval())


def tiny_llama(gqa=True, tied=False, seed=0) -> LlamaForCausalLM:
  torch.manual_seed(seed)
  return _randomized(LlamaForCausalLM(tiny_llama_config(gqa, tied)).eval())


def _randomized(model):
  """Every parameter random (norm scales and biases included), so a mix-up cannot hide."""
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p))
  return model


def save_tokenizer(folder) -> None:
  """A word-level tokenizer with a chat template: enough to check the files travel with OUT."""
  vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "<image>"])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                 eos_token="</s>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(folder)


def save_state_dict(sd: dict, folder, mode: str) -> None:
  """Writes `sd` as `single` / `sharded` safetensors or `bin` / `sharded_bin` PyTorch files."""
  sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
  if mode == "single":
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
  elif mode == "bin":
    torch.save(sd, folder / "pytorch_model.bin")
  elif mode in ("sharded", "sharded_bin"):
    ext = "safetensors" if mode == "sharded" else "bin"
    stem = "model" if mode == "sharded" else "pytorch_model"
    names = sorted(sd)
    parts = [names[i::3] for i in range(3)]  # interleaved: every layer spans several shards
    weight_map = {}
    for j, part in enumerate(parts):
      fname = f"{stem}-{j + 1:05d}-of-00003.{ext}"
      chunk = {k: sd[k] for k in part}
      save_file(chunk, folder / fname) if ext == "safetensors" else torch.save(chunk, folder / fname)
      weight_map.update({k: fname for k in part})
    (folder / f"{stem}.{ext}.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
  else:
    raise ValueError(mode)


def hf_folder(tmp_path, model, mode="save_pretrained", sd=None, name="src"):
  """A Hugging Face folder: config, tokenizer, and the weights in `mode` (see save_state_dict)."""
  folder = tmp_path / name
  if mode == "save_pretrained":
    model.save_pretrained(folder)
  elif mode == "save_pretrained_sharded":
    model.save_pretrained(folder, max_shard_size="4KB")
  else:
    folder.mkdir()
    model.config.save_pretrained(folder)
    save_state_dict(model.state_dict() if sd is None else sd, folder, mode)
  save_tokenizer(folder)
  return folder


def t(x) -> np.ndarray:
  return x.detach().numpy()


def expected_llama_tree(lm, head) -> dict:
  """The jaxmm params tree of a LLaMA decoder, read from the torch modules (the oracle)."""
  layers = lm.layers
  stack = lambda f: np.stack([f(layer) for layer in layers])
  lin = lambda get: {"kernel": stack(lambda l: t(get(l).weight).T)}
  tree = {
      "embed": t(lm.embed_tokens.weight),
      "layers": {
          "attn_norm": {"scale": stack(lambda l: t(l.input_layernorm.weight))},
          "attn": {"q": lin(lambda l: l.self_attn.q_proj), "k": lin(lambda l: l.self_attn.k_proj),
                   "v": lin(lambda l: l.self_attn.v_proj), "o": lin(lambda l: l.self_attn.o_proj)},
          "mlp_norm": {"scale": stack(lambda l: t(l.post_attention_layernorm.weight))},
          "mlp": {"gate": lin(lambda l: l.mlp.gate_proj), "up": lin(lambda l: l.mlp.up_proj),
                  "down": lin(lambda l: l.mlp.down_proj)},
      },
      "norm": {"scale": t(lm.norm.weight)},
  }
  if head is not None:
    tree["lm_head"] = {"kernel": t(head.weight).T}
  return tree


def expected_llava_tree(model) -> dict:
  """The jaxmm params tree of a LLaVA model, read from the torch modules (the oracle)."""
  vt, pr = model.model.vision_tower, model.model.multi_modal_projector
  vt = getattr(vt, "vision_model", vt)
  layers = vt.encoder.layers
  stack = lambda f: np.stack([f(layer) for layer in layers])
  dense = lambda get: {"kernel": stack(lambda l: t(get(l).weight).T),
                       "bias": stack(lambda l: t(get(l).bias))}
  ln = lambda get: {"scale": stack(lambda l: t(get(l).weight)), "bias": stack(lambda l: t(get(l).bias))}
  proj = lambda lin: ({"kernel": t(lin.weight).T} |
                      ({"bias": t(lin.bias)} if lin.bias is not None else {}))
  emb = vt.embeddings
  tied = model.config.text_config.tie_word_embeddings
  return {
      "vision": {
          "patch_embed": {"kernel": t(emb.patch_embedding.weight).transpose(2, 3, 1, 0)},
          "class_embed": t(emb.class_embedding),
          "pos_embed": t(emb.position_embedding.weight),
          "pre_ln": {"scale": t(vt.pre_layrnorm.weight), "bias": t(vt.pre_layrnorm.bias)},
          "layers": {
              "ln1": ln(lambda l: l.layer_norm1),
              "attn": {"q": dense(lambda l: l.self_attn.q_proj), "k": dense(lambda l: l.self_attn.k_proj),
                       "v": dense(lambda l: l.self_attn.v_proj), "o": dense(lambda l: l.self_attn.out_proj)},
              "ln2": ln(lambda l: l.layer_norm2),
              "mlp": {"fc1": dense(lambda l: l.mlp.fc1), "fc2": dense(lambda l: l.mlp.fc2)},
          }},
      "projector": {"fc1": proj(pr.linear_1), "fc2": proj(pr.linear_2)},
      "llm": expected_llama_tree(model.model.language_model, None if tied else model.lm_head),
  }


def assert_trees_equal(got, want, path="") -> None:
  assert isinstance(got, dict), path
  assert sorted(got) == sorted(want), f"{path}: keys {sorted(got)} != {sorted(want)}"
  for k in want:
    if isinstance(want[k], dict):
      assert_trees_equal(got[k], want[k], f"{path}/{k}")
    else:
      g = np.asarray(got[k])
      assert g.shape == want[k].shape, f"{path}/{k}: {g.shape} != {want[k].shape}"
      np.testing.assert_array_equal(g, want[k], err_msg=f"{path}/{k}")
