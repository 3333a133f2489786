"""Train a small LLaVA from scratch on digits-VQA: `jaxmm train vlm --out OUT`.

CLIP-style ViT -> 2-layer MLP projector -> LLaMA decoder, with a word-level tokenizer whose
vocabulary is the question/answer words. Each training sequence is a multi-turn conversation
about one image (LLaVA-1.5's training format: `USER: <image> q1 ASSISTANT: a1 </s> USER: q2 ...`);
the loss is next-token cross-entropy on the answer tokens (and their `</s>`) only, so one pass
over the visual tokens supervises several answers.

OUT receives ckpt/ (orbax; a killed run resumes from its last checkpoint), log.jsonl and model/
(a converted-format folder with the tokenizer and processor: `jaxmm.load(OUT / "model")`).
With `--llm FOLDER` (a converted `llama` model, e.g. SmolLM2-135M) the decoder is that model,
kept frozen, with its own tokenizer plus an `<image>` token; only the vision tower and the
projector train.
"""
import argparse
import dataclasses
import hashlib
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxmm.cli
from jaxmm import api, checkpoint, inputs
from jaxmm.config import ClipVisionConfig, LlamaConfig, LlavaConfig
from jaxmm.data import digits_vqa
from jaxmm.data.tokenizer import llava_processor, word_tokenizer
from jaxmm.errors import JaxmmError
from jaxmm.models import llama, llava, segments
from jaxmm.models.clip import sincos_positions  # noqa: F401  (part of this module's API)
from jaxmm.models.decoder import causal_mask
from jaxmm.pruning.state import TokenState

# CLIP normalisation, as the saved CLIPImageProcessor applies it (pixels / 255, then these).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Model sizes, data and optimisation of one training run."""
  data: digits_vqa.DigitsVQAConfig = digits_vqa.DigitsVQAConfig()
  patch_size: int = 4
  vision_width: int = 128
  vision_layers: int = 4
  vision_heads: int = 4
  text_width: int = 128
  text_layers: int = 8
  text_heads: int = 4
  text_kv_heads: int = 2
  train_images: int = 16384
  turns_per_category: int = 2     # questions of each category per training conversation
  steps: int = 600
  batch_size: int = 32
  lr: float = 2e-3
  vision_lr_mult: float = 1.0     # the vision tower, projector and auxiliary head train at lr * this
  schedule: str = "cosine"        # after the linear warmup: "cosine" (to 2% of lr) or "constant"
  b2: float = 0.98
  warmup: int = 50
  weight_decay: float = 0.01
  pos_init: str = "random"        # ViT position embeddings: "random" (std 0.02) or "sincos" (2-D)
  aux_weight: float = 0.0         # weight of the auxiliary per-cell digit loss (see `aux_logits`)
  tie_embeddings: bool = False    # the LM head is the transposed token embedding (as in SmolLM2)
  probe_weight: float = 0.0       # weight of the question-key probe loss (see `probe_loss`)
  probe_layer: int = 2            # the probe reads the hidden state after this many layers
  ground_weight: float = 0.0      # weight of the attention grounding loss (see `grounding_loss`)
  aux_pool: str = "cell"          # the digit loss reads each cell's mean token, every "token",
                                  # or only the tokens with "ink" (see `aux_logits`)
  ground_layer: int = 2           # the decoder layer (0-based) whose heads are grounded
  count_head: str = ""            # "histogram": also ground a counting head (`counting_head`)
  cell_weight: float = 0.0        # weight of the visual tokens' cell probe (see `cell_loss`)
  early_weight: float = 0.0       # weight of the early answer read-out (see `early_answer_loss`)
  early_layer: int = 4            # ... read from the hidden state after this many layers
  rope_theta: float = 10000.0     # decoder RoPE base; a large one leaves more slow, content dims
  lora_rank: int = 0              # > 0 (with a frozen --llm): LoRA adapters on every attention
                                  # projection, merged into the saved decoder (see `lora_merge`)
  seed: int = 0
  ckpt_every: int = 100
  log_every: int = 10

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    return cls(**{**d, "data": digits_vqa.DigitsVQAConfig(**d["data"])})


def default() -> TrainConfig:
  """The embedded default (`make demo`): 96 px grids of 3x3 cells, each cell 4x4 tiles of 8 px
  with the digit in one random tile; patch 8 -> 144 visual tokens, 9 of them with ink; 8-layer
  decoder of width 64.

  From scratch, the decoder settles on the answer prior: the answer depends on question and image
  only jointly, so neither half of the lookup gets a first-order gradient alone. What gets it
  past that, each a training-only loss (nothing is added to the saved model): the per-patch
  digit loss through the tied LM head (`aux_logits`), the question probe (`probe_loss`), the
  visual tokens' cell probe (`cell_loss`), attention grounding of a lookup head and of a
  histogram-counting head in another KV group (`grounding_loss`), and the answer read early,
  after layer 4 (`early_answer_loss`). Also: 2-D sin/cos ViT positions, a 3x learning rate on
  the image side and RoPE base 1e6 (more slowly rotating dimensions for content lookup).
  3000 steps of batch 8 take about 14 minutes on 2 CPU cores.
  """
  return TrainConfig(data=digits_vqa.DigitsVQAConfig(grid=3, cell_px=32, tiles=4), patch_size=8,
                     vision_width=64, vision_layers=2, text_width=64, text_layers=8,
                     batch_size=8, lr=3e-3, vision_lr_mult=3.0, b2=0.95,
                     pos_init="sincos", aux_weight=1.0, aux_pool="ink", tie_embeddings=True,
                     probe_weight=1.0, ground_weight=1.0, cell_weight=1.0, rope_theta=1e6,
                     count_head="histogram", early_weight=1.0, steps=3000)


def tiny() -> TrainConfig:
  """Seconds-long runs for tests: 16 px / patch 4 (16 visual tokens), 2+2 layers of width 32."""
  return TrainConfig(data=digits_vqa.DigitsVQAConfig(grid=2, cell_px=8), vision_width=32,
                     vision_layers=2, vision_heads=2, text_width=32, text_layers=2, text_heads=2,
                     text_kv_heads=1, train_images=64, steps=6, batch_size=4, warmup=2,
                     ckpt_every=2, log_every=1)


def smollm2() -> TrainConfig:
  """For `--llm` = the converted SmolLM2-135M-Instruct (frozen, 30 layers of width 576): the
  default's images and image-side losses, patch 16 (36 visual tokens: each step runs the
  30-layer decoder forward and backward on 8 conversations, so the sequence is what costs), a
  ViT of width 128, and LoRA rank 8 on the attention projections (at lr 2e-3; the image side at
  3e-3), which learn the lookup that the grounding loss asks of head 0 of layer 26 (and the
  histogram of head 3).

  Why layer 26 of 30: grounded at layer 4 (as the demo grounds early), head 0 learned to find
  the asked patch but after 350 steps the answers were at chance (cell 10%, presence 50%): 25
  frozen MLPs lie between that lookup and the LM head. Near the top, the copied digit only has
  to pass three layers. No early answer read-out: the grounded layer is already near the head.
  """
  return dataclasses.replace(default(), patch_size=16, vision_width=128, vision_heads=4,
                             lr=2e-3, vision_lr_mult=1.5, probe_layer=26, ground_layer=26,
                             early_weight=0.0, lora_rank=8, steps=600, ckpt_every=50)


PRESETS = {"default": default, "smollm2": smollm2, "tiny": tiny}


# Fields added after models were cached: they enter the fingerprint only when not at their
# default, so a cached model of an unchanged preset stays valid.
_LATER_FIELDS = {"lora_rank": 0}


def fingerprint(tc: TrainConfig) -> str:
  d = {k: v for k, v in tc.to_dict().items() if _LATER_FIELDS.get(k, object()) != v}
  return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# ---- model ---------------------------------------------------------------------------------------

def model_config(tc: TrainConfig, tok, text: LlamaConfig | None = None) -> LlavaConfig:
  """The LlavaConfig trained: the decoder is built from `tc`, or is `text` (a frozen LLM)."""
  size = tc.data.image_size
  vision = ClipVisionConfig(hidden_size=tc.vision_width, intermediate_size=4 * tc.vision_width,
                            num_layers=tc.vision_layers, num_heads=tc.vision_heads,
                            image_size=size, patch_size=tc.patch_size)
  if text is None:
    w, h = tc.text_width, tc.text_heads
    text = LlamaConfig(vocab_size=len(tok), hidden_size=w, intermediate_size=(8 * w) // 3 // 8 * 8,
                       num_layers=tc.text_layers, num_heads=h, num_kv_heads=tc.text_kv_heads,
                       head_dim=w // h, rms_norm_eps=1e-5, max_position_embeddings=512,
                       bos_token_id=tok.bos_token_id, eos_token_ids=(tok.eos_token_id,),
                       pad_token_id=tok.pad_token_id, tie_word_embeddings=tc.tie_embeddings,
                       rope_theta=tc.rope_theta)
  elif text.pad_token_id is None:  # padding is masked by id: use the tokenizer's (EOS)
    text = dataclasses.replace(text, pad_token_id=tok.pad_token_id)
  # The last ViT layer feeds the projector: trained from scratch, no layer is "too specific".
  return LlavaConfig(vision=vision, text=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                     vision_feature_layer=-1)


def init_params(cfg: LlavaConfig, key, llm_params=None, pos_init: str = "random") -> dict:
  """A freshly initialised LLaVA params tree (`llava.init_params`; the decoder is `llm_params`
  when given)."""
  return llava.init_params(cfg, key, pos_init, llm=llm_params)


def init_lora(layers: dict, rank: int, key) -> dict:
  """LoRA factors of every attention projection of a stacked decoder:
  {name: {"a": f[L, D_in, r], "b": f[L, r, D_out]}} for q, k, v, o.

  `b` starts at zero, so training starts from the pretrained decoder exactly; `a` is drawn with
  variance 1 / D_in, so a@b moves at the scale of the inputs.
  """
  out = {}
  for name, k in zip(("q", "k", "v", "o"), jax.random.split(key, 4)):
    n, d_in, d_out = layers["attn"][name]["kernel"].shape
    out[name] = {"a": jax.random.normal(k, (n, d_in, rank)) * d_in ** -0.5,
                 "b": jnp.zeros((n, rank, d_out))}
  return out


def lora_merge(layers: dict, lora: dict) -> dict:
  """The stacked decoder layers with each adapted kernel W replaced by W + a @ b."""
  attn = dict(layers["attn"])
  for name, ab in lora.items():
    w = attn[name]["kernel"]
    attn[name] = {**attn[name], "kernel": w + jnp.einsum("lir,lro->lio", ab["a"], ab["b"])}
  return {**layers, "attn": attn}


# ---- data ----------------------------------------------------------------------------------------

def pixel_values(images_NxHxW: np.ndarray) -> np.ndarray:
  """f32[N, 3, H, W]: grayscale uint8 grids as the saved processor preprocesses them."""
  x = images_NxHxW.astype(np.float32)[..., None] / 255.0
  return ((x - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2)


class Encoder:
  """Conversations -> token ids through the model's tokenizer, segment by segment (cached).

  Segments are split where the chat template puts whitespace and keep it, so the ids equal
  those of the templated text for the word-level tokenizer and for a byte-level BPE (pre-split
  before each space); `prompt` is exactly what the processor produces.
  """

  def __init__(self, tok, num_image_tokens: int, image_token_id: int):
    self.tok, self._cache = tok, {}
    self.image = [image_token_id] * num_image_tokens

  def _ids(self, text: str) -> list:
    if text not in self._cache:
      self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
    return self._cache[text]

  def prompt(self, question: str, first: bool = True) -> list:
    # Segments keep the whitespace the template puts before them: a byte-level BPE (SmolLM2's)
    # codes " What" and "What" differently; the word tokenizer ignores it.
    head = self._ids("USER:") + self._ids(" ") + self.image if first else self._ids("USER:")
    return head + self._ids(" " + question) + self._ids(" ASSISTANT:")

  def conversation(self, turns, keys=None) -> tuple[list, list, list]:
    """(ids, is_target, key) for [(question, answer), ...]: targets are answer tokens and EOS;
    `key` holds keys[i] at the last prompt token of turn i (the one that predicts the answer)
    and -1 elsewhere."""
    ids, target, key = [], [], []
    for i, (q, a) in enumerate(turns):
      p, ans = self.prompt(q, i == 0), self._ids(a) + [self.tok.eos_token_id]
      ids += p + ans
      target += [False] * len(p) + [True] * len(ans)
      key += [-1] * (len(p) - 1) + [-1 if keys is None else keys[i]] + [-1] * len(ans)
    return ids, target, key


def question_key(cat: str, question: str, grid: int) -> int:
  """The class of what a question asks: cell (r, c) -> r*G + c; count d -> G*G + d; presence
  d -> G*G + 10 + d."""
  nums = [int(w) for w in question.split() if w.isdigit()]
  if cat == "cell":
    return (nums[0] - 1) * grid + nums[1] - 1
  return grid * grid + nums[0] + (10 if cat == "presence" else 0)


def encode_training_set(enc: Encoder, items, seed: int, pad_id: int, grid: int):
  """(ids i32[N, T], target bool[N, T], key i32[N, T]) right padded (see `Encoder.conversation`);
  the turn order is shuffled per image."""
  rng = np.random.default_rng(seed)
  rows = []
  for qa in items:
    order = rng.permutation(len(qa))
    rows.append(enc.conversation([qa[i][1:] for i in order],
                                 [question_key(*qa[i][:2], grid) for i in order]))
  t = -(-max(len(r[0]) for r in rows) // 8) * 8
  ids = np.full((len(rows), t), pad_id, np.int32)
  target = np.zeros((len(rows), t), bool)
  key = np.full((len(rows), t), -1, np.int32)
  for i, (r, m, k) in enumerate(rows):
    ids[i, :len(r)], target[i, :len(m)], key[i, :len(k)] = r, m, k
  return ids, target, key


# ---- training ------------------------------------------------------------------------------------

def optimizer(tc: TrainConfig, frozen_llm: bool) -> optax.GradientTransformation:
  """AdamW with clipping over {"params": LLaVA params, "aux": auxiliary head}.

  The decoder (or, frozen, its LoRA adapters) trains at `lr`; the vision tower, projector and
  auxiliary head at `lr * vision_lr_mult`, so the image side is not left behind while the decoder
  fits the answer prior.
  """
  def adamw(lr):
    total = max(tc.steps, tc.warmup + 1)
    if tc.schedule == "cosine":
      sched = optax.warmup_cosine_decay_schedule(0.0, lr, tc.warmup, total, lr * 0.02)
    elif tc.schedule == "constant":
      sched = optax.join_schedules([optax.linear_schedule(0.0, lr, max(tc.warmup, 1)),
                                    optax.constant_schedule(lr)], [max(tc.warmup, 1)])
    else:
      raise JaxmmError(f"schedule must be 'cosine' or 'constant', got {tc.schedule!r}")
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, b1=0.9, b2=tc.b2, weight_decay=tc.weight_decay))
  transforms = {"llm": optax.set_to_zero() if frozen_llm else adamw(tc.lr),
                "vision": adamw(tc.lr * tc.vision_lr_mult), "lora": adamw(tc.lr)}
  labels = lambda t: {"params": {k: ("llm" if k == "llm" else "vision") for k in t["params"]},
                      "aux": "vision", **({"lora": "lora"} if "lora" in t else {})}
  return optax.multi_transform(transforms, labels)


def init_aux_head(cfg: LlavaConfig, tc: TrainConfig) -> dict:
  """Training-only weights, never saved: a bias over the 10 digits for the per-cell loss (the
  rest is the LM head), the question-key probe and the visual tokens' cell probe."""
  n_keys = tc.data.grid ** 2 + 20
  return {"bias": jnp.zeros((10,)),
          "probe": jnp.zeros((cfg.text.hidden_size, n_keys)),
          "cell": jnp.zeros((cfg.text.hidden_size, tc.data.grid ** 2))}


def _unit_rms(x_BxNxD, eps: float):
  """x / RMS(x) over the last axis: an RMSNorm without its learned scale."""
  return x_BxNxD * jax.lax.rsqrt(jnp.mean(x_BxNxD ** 2, -1, keepdims=True) + eps)


def cell_loss(cfg: LlavaConfig, tc: TrainConfig, head: dict, feats_BxVxD):
  """Cross-entropy of a linear probe reading each visual token's grid cell from its projected
  features (RMS-normalised, as the decoder's first layer sees them).

  Why: a cell question is answered by attention whose query names the cell, so the keys of the
  visual tokens must separate cells linearly. The ViT's position codes vary smoothly across a
  cell boundary; this makes "which cell" an explicit, linear feature from the first steps.
  """
  h = _unit_rms(feats_BxVxD, cfg.text.rms_norm_eps)
  labels = jnp.broadcast_to(jnp.asarray(cell_of_patch(tc)), h.shape[:2])
  return optax.softmax_cross_entropy_with_integer_labels(h @ head["cell"], labels).mean()


def early_answer_loss(cfg: LlavaConfig, llm, h_BxTxD, ids_BxT, key_BxT):
  """Cross-entropy of the answer read from a middle layer's hidden state through the decoder's
  own final norm and LM head, at each answer-predicting token (no weights are added).

  Why: the grounded heads of layer `ground_layer` fetch the answer's evidence (the looked-up
  digit, or the counting head's digit histogram); this asks the next layers to turn it into the
  answer at once, so the read-out of a count gets a gradient over a short path instead of
  through every later layer.
  """
  logits = llama.lm_logits(cfg.text, llm, h_BxTxD[:, :-1])
  w = (key_BxT[:, :-1] >= 0).astype(jnp.float32)
  labels = jnp.where(w > 0, ids_BxT[:, 1:], 0)   # see `loss_fn`: no out-of-vocabulary labels
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


def probe_loss(cfg: LlavaConfig, head: dict, h_BxTxD, key_BxT):
  """Cross-entropy of a linear probe reading, at each answer-predicting token, what the question
  asks about (the cell, or the digit) from a middle layer's hidden state.

  Why: the answer depends on the question and the image only jointly, so at the start neither
  "bring the question to the answer position" nor "look at the image" gets a first-order
  gradient on its own, and training sits at the answer prior. The probe gives the first step
  its own signal; the decoder then only has to learn the lookup.
  """
  logits = _unit_rms(h_BxTxD, cfg.text.rms_norm_eps) @ head["probe"]
  w = (key_BxT >= 0).astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(key_BxT, 0))
  return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


def aux_logits(cfg: LlavaConfig, tc: TrainConfig, llm, head: dict, digit_ids, feats_BxVxD):
  """f[B, G*G, 10] (aux_pool "cell") or f[B, V, 10] ("token", "ink"): digit logits of every grid
  cell, read from its mean-pooled visual tokens, or of every visual token (the loss then keeps,
  for "ink", only the patches that hold ink: a blank patch cannot know its cell's digit).

  The patches of a cell form a square block (cells align with patches). The read-out is the
  decoder's own final norm and LM head, restricted to the digit tokens: the loss pulls each
  cell's projected features towards the output direction of its digit, so the image side
  encodes "which digit is where" from the first steps, in the decoder's own vocabulary, and the
  decoder only has to learn where to look and copy. No weights are added to the model.
  """
  g, side = tc.data.grid, tc.data.image_size // tc.patch_size
  s = side // g
  b, _, d = feats_BxVxD.shape
  ids = jnp.asarray(digit_ids)  # only the digit rows of the head: a 49k-word LM head is costly
  digits = ({**llm, "embed": llm["embed"][ids]} if cfg.text.tie_word_embeddings else
            {**llm, "lm_head": {"kernel": llm["lm_head"]["kernel"][:, ids]}})
  if tc.aux_pool in ("token", "ink"):  # visual tokens carry the digit of their own cell
    return llama.lm_logits(cfg.text, digits, feats_BxVxD) + head["bias"]
  cells = feats_BxVxD.reshape(b, g, s, g, s, d).mean((2, 4)).reshape(b, g * g, d)
  return llama.lm_logits(cfg.text, digits, cells) + head["bias"]


def cell_of_patch(tc: TrainConfig) -> np.ndarray:
  """i32[V]: the grid cell of each patch, patches in row-major order."""
  g, side = tc.data.grid, tc.data.image_size // tc.patch_size
  r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  return ((r // (side // g)) * g + c // (side // g)).reshape(-1)


def ink_patches(tc: TrainConfig, pixels_BxCxHxW):
  """bool[B, V]: the patches (row-major) that hold any ink, i.e. any pixel above background."""
  blank = -CLIP_MEAN[0] / CLIP_STD[0]
  b, _, h, w = pixels_BxCxHxW.shape
  p = tc.patch_size
  ink = pixels_BxCxHxW[:, 0] > blank + 1e-3
  return ink.reshape(b, h // p, p, w // p, p).any((2, 4)).reshape(b, -1)


def cell_of_position(tc: TrainConfig, ids_BxT, image_token_id: int):
  """i32[B, T]: the grid cell each visual token's patch lies in (-1 for text tokens)."""
  side = tc.data.image_size // tc.patch_size
  is_img = ids_BxT == image_token_id
  idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, side * side - 1)
  return jnp.where(is_img, jnp.asarray(cell_of_patch(tc))[idx], -1)


def counting_head(cfg: LlavaConfig) -> int:
  """The head `count_head` grounds: the first of the second KV group, so that it shares no keys
  and values with the lookup head 0 (head 1 when there is one KV group). Sharing them, the
  lookup (keys that tell digits apart) and the histogram (keys alike for every digit) fight."""
  group = cfg.text.num_heads // cfg.text.num_kv_heads
  return group if cfg.text.num_kv_heads > 1 else 1


def relevant_tokens(cfg: LlavaConfig, tc: TrainConfig, ids_BxT, key_BxT, cells_BxC, pixels):
  """bool[B, T, S]: at each answer-predicting token, the visual tokens its question is about.

  The asked cell (cell questions), or every cell holding the asked digit (count, presence);
  with aux_pool "ink" only the patches of those cells that hold ink.
  """
  g2 = tc.data.grid ** 2
  digit = jnp.where(key_BxT < g2, -1, (key_BxT - g2) % 10)
  rel_cells = jnp.where((key_BxT < g2)[..., None],
                        jax.nn.one_hot(key_BxT, g2, dtype=bool),
                        cells_BxC[:, None, :] == digit[..., None])     # [B, T, C]
  cell = cell_of_position(tc, ids_BxT, cfg.image_token_id)           # [B, S]
  rel = jnp.take_along_axis(rel_cells, jnp.maximum(cell, 0)[:, None, :], axis=2)
  return rel & informative_slots(cfg, tc, ids_BxT, pixels)[:, None] & (key_BxT >= 0)[..., None]


def informative_slots(cfg: LlavaConfig, tc: TrainConfig, ids_BxT, pixels):
  """bool[B, S]: the visual tokens that show a digit (the ink patches with aux_pool "ink",
  else every visual token)."""
  cell = cell_of_position(tc, ids_BxT, cfg.image_token_id)           # [B, S]
  if tc.aux_pool != "ink":
    return cell >= 0
  idx = jnp.clip(jnp.cumsum(cell >= 0, axis=1) - 1, 0, None)
  return jnp.take_along_axis(ink_patches(tc, pixels), idx, axis=1) & (cell >= 0)


def grounding_loss(cfg: LlavaConfig, tc: TrainConfig, logp_BxHxTxS, mask_BxTxS, ids_BxT,
                   key_BxT, cells_BxC, pixels):
  """Attention supervision of layer `ground_layer` at each answer-predicting token, from that
  layer's log attention probabilities f32[B, H, T, S] (the prefill's "attn_logp" capture).

  Head 0 looks things up: -log(its attention mass on the relevant tokens, `relevant_tokens`)
  for every question that has some (cell; count and presence when the digit is there).
  With count_head "histogram", head `counting_head` is grounded at count questions with the
  cross-entropy to uniform attention over the informative tokens (`informative_slots`): its
  output is the mean of their values, which, with values that code the digit, is the grid's
  digit histogram / G², a linear code of every count; the layer's gated MLP then reads the asked
  digit's entry. (Grounding it to the relevant tokens plus a BOS sink, so that its output codes
  k / (k + G²), trained slower and worse; all mass on the relevant tokens, as head 0 learns,
  gives the same output for every count.)

  Like the probe, this gives the image lookup its own signal instead of one that exists only
  once the question has reached the answer token.
  """
  g2 = tc.data.grid ** 2
  rel = relevant_tokens(cfg, tc, ids_BxT, key_BxT, cells_BxC, pixels)
  lookup = ((key_BxT >= 0) & rel.any(-1)).astype(jnp.float32)
  logp0 = logp_BxHxTxS[:, 0]
  total = (-jax.nn.logsumexp(jnp.where(rel, logp0, -1e30), axis=-1) * lookup).sum()
  count = lookup.sum()
  if tc.count_head:
    counting = ((key_BxT >= g2) & (key_BxT < g2 + 10)).astype(jnp.float32)
    logp1 = logp_BxHxTxS[:, counting_head(cfg)]
    tgt = informative_slots(cfg, tc, ids_BxT, pixels)[:, None].astype(jnp.float32)   # [B, 1, S]
    ce = -(tgt * jnp.where(mask_BxTxS, logp1, 0.0)).sum(-1) / jnp.maximum(tgt.sum(-1), 1.0)
    total, count = total + (ce * counting).sum(), count + counting.sum()
  return total / jnp.maximum(count, 1.0)


def decoder_pass(cfg: LlavaConfig, tc: TrainConfig, params, ids_BxT, feats_BxVxD):
  """The decoder over right-padded conversations through the one prefill path
  (`segments.prefill`, unpruned), with the captures the losses read. Returns (h f[B, T, D]
  leaving the last layer, hidden f[L, B, T, D] each layer's output or None, the "attn_logp"
  f32[B, H, T, S] of layer `ground_layer` or None)."""
  valid = ids_BxT != cfg.text.pad_token_id
  x = llava.merge_image_features(cfg, llama.embed(cfg.text, params["llm"], ids_BxT), ids_BxT,
                                 feats_BxVxD)
  b, t = ids_BxT.shape
  state = TokenState(hidden=x, positions=inputs.positions_from_mask(valid), valid=valid,
                     visual=(ids_BxT == cfg.image_token_id) & valid,
                     origin=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
  stack = ("hidden",) if tc.probe_weight or tc.early_weight else ()
  probes = {tc.ground_layer: ("attn_logp",)} if tc.ground_weight else None
  pre = segments.prefill(llava.decoder(cfg), params["llm"], state, (), None, stack=stack,
                         probes=probes)
  logp = pre.probed[tc.ground_layer]["attn_logp"] if tc.ground_weight else None
  return pre.segments[-1].state.hidden, pre.stacked.get("hidden"), logp


def loss_fn(cfg: LlavaConfig, tc: TrainConfig, digit_ids, train, ids_BxT, target_BxT, key_BxT,
            pixels, cells_BxC, frozen_llm: bool, n_targets: int | None = None):
  """Answer cross-entropy plus the weighted auxiliary losses; (loss, {metric: value}).

  ids/target/key [B, T] as `encode_training_set` gives them, pixels f32[B, 3, H, W], cells
  i32[B, G*G] the digit of each grid cell (row-major). `train` holds "params", "aux" and, with
  LoRA, "lora". n_targets (static), when given, is at least the number of target tokens of any
  row: the LM head then runs on those positions only.
  """
  params = train["params"]
  if frozen_llm:  # no weight gradients for the LLM; activations still carry them to the vision
    params = {**params, "llm": jax.lax.stop_gradient(params["llm"])}
  if "lora" in train:
    llm = params["llm"]
    params = {**params, "llm": {**llm, "layers": lora_merge(llm["layers"], train["lora"])}}
  feats = llava.image_features(cfg, params, pixels)
  h, hidden, logp = decoder_pass(cfg, tc, params, ids_BxT, feats)
  probe = (probe_loss(cfg, train["aux"], hidden[tc.probe_layer - 1], key_BxT)
           if tc.probe_weight else jnp.zeros(()))
  ground = (grounding_loss(cfg, tc, logp, causal_mask(ids_BxT != cfg.text.pad_token_id),
                           ids_BxT, key_BxT, cells_BxC, pixels)
            if tc.ground_weight else jnp.zeros(()))
  early = (early_answer_loss(cfg, params["llm"], hidden[tc.early_layer - 1], ids_BxT,
                             key_BxT) if tc.early_weight else jnp.zeros(()))
  h, labels, w = h[:, :-1], ids_BxT[:, 1:], target_BxT[:, 1:]
  if n_targets:  # the target positions first (stable), then as many others as the row needs
    at = jnp.argsort(~w, axis=1, stable=True)[:, :n_targets]
    h = jnp.take_along_axis(h, at[..., None], axis=1)
    labels, w = jnp.take_along_axis(labels, at, axis=1), jnp.take_along_axis(w, at, axis=1)
  logits, w = llama.lm_logits(cfg.text, params["llm"], h), w.astype(jnp.float32)
  # Non-targets get label 0: an added `<image>` id lies past a pretrained LM head's vocabulary,
  # and its NaN cross-entropy would survive the zero weight.
  labels = jnp.where(w > 0, labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  n = jnp.maximum(w.sum(), 1.0)
  acc = ((jnp.argmax(logits, -1) == labels) * w).sum() / n
  aux = optax.softmax_cross_entropy_with_integer_labels(
      aux_logits(cfg, tc, params["llm"], train["aux"], digit_ids, feats),
      cells_BxC if tc.aux_pool == "cell" else cells_BxC[:, cell_of_patch(tc)])
  if tc.aux_pool == "ink":  # only the patches that hold ink know their cell's digit
    ink = ink_patches(tc, pixels).astype(jnp.float32)
    aux = (aux * ink).sum() / jnp.maximum(ink.sum(), 1.0)
  else:
    aux = aux.mean()
  cell = cell_loss(cfg, tc, train["aux"], feats) if tc.cell_weight else jnp.zeros(())
  total = ((ce * w).sum() / n + tc.aux_weight * aux + tc.probe_weight * probe
           + tc.ground_weight * ground + tc.cell_weight * cell + tc.early_weight * early)
  return total, {"answer_token_acc": acc, "aux_loss": aux, "probe_loss": probe,
                 "ground_loss": ground, "cell_loss": cell, "early_loss": early}


def make_train_step(cfg: LlavaConfig, tc: TrainConfig, digit_ids, tx, frozen_llm: bool = False,
                    n_targets: int | None = None):
  @jax.jit
  def step(state, ids, target, key, pixels, cells):
    train = {k: v for k, v in state.items() if k != "opt_state"}
    grad_fn = jax.value_and_grad(loss_fn, argnums=3, has_aux=True)
    (loss, metrics), g = grad_fn(cfg, tc, digit_ids, train, ids, target, key, pixels, cells,
                                 frozen_llm, n_targets)
    updates, opt = tx.update(g, state["opt_state"], train)
    new = optax.apply_updates(train, updates)
    return {**new, "opt_state": opt}, loss, metrics
  return step


def batch_rows(tc: TrainConfig, step: int, n: int) -> np.ndarray:
  """The training rows of a step: a pure function of (seed, step), so resuming needs no state."""
  return np.random.default_rng([tc.seed, step]).choice(n, tc.batch_size, replace=False)


# ---- a run ---------------------------------------------------------------------------------------

def _tokenizer_and_llm(tc: TrainConfig, llm_dir):
  """(tokenizer, frozen LLM model or None). A word tokenizer unless an LLM folder is given."""
  if llm_dir is None:
    return word_tokenizer(digits_vqa.words(tc.data)), None
  from transformers import AutoTokenizer
  m = api.load(llm_dir)
  if m.family != "llama":
    raise JaxmmError(f"--llm needs a converted llama model, {llm_dir} holds {m.family!r}")
  try:
    tok = AutoTokenizer.from_pretrained(llm_dir)
  except (OSError, ValueError) as e:
    raise JaxmmError(f"--llm {llm_dir}: no loadable tokenizer ({e})") from None
  tok.add_tokens(["<image>"], special_tokens=True)
  if tok.pad_token_id is None:
    tok.pad_token = tok.eos_token
  return tok, m


def validate(tc: TrainConfig, cfg: LlavaConfig, frozen_llm: bool = False) -> None:
  """Refuses a configuration the losses cannot be computed for, naming the setting."""
  side = tc.data.image_size // tc.patch_size
  if tc.data.image_size % tc.patch_size or side % tc.data.grid:
    raise JaxmmError(f"grid cells must align with patches: image {tc.data.image_size} px, patch "
                     f"{tc.patch_size}, grid {tc.data.grid}")
  if tc.aux_pool not in ("cell", "token", "ink"):
    raise JaxmmError(f"aux_pool must be 'cell', 'token' or 'ink', got {tc.aux_pool!r}")
  n = cfg.text.num_layers
  for name, on, layer in (("probe", tc.probe_weight, tc.probe_layer),
                          ("ground", tc.ground_weight, tc.ground_layer),
                          ("early", tc.early_weight, tc.early_layer)):
    if on and not 1 <= layer < n:
      raise JaxmmError(f"{name}_layer must be in 1..{n - 1} (it reads a layer's input), got {layer}")
  if tc.count_head not in ("", "histogram"):
    raise JaxmmError(f"count_head must be '' or 'histogram', got {tc.count_head!r}")
  if tc.ground_weight and tc.count_head and cfg.text.num_heads < 2:
    raise JaxmmError("ground_weight needs >= 2 decoder heads (a lookup and a counting head)")
  if tc.lora_rank < 0 or (tc.lora_rank and not frozen_llm):
    raise JaxmmError(f"lora_rank {tc.lora_rank}: LoRA adapts a frozen decoder; give --llm "
                     "(a decoder trained from scratch trains all its weights)")


class Run:
  """One training run: data, model, optimiser; `state` is the checkpointed pytree."""

  def __init__(self, tc: TrainConfig, llm_dir=None):
    self.tc = tc
    self.tok, llm = _tokenizer_and_llm(tc, llm_dir)
    self.frozen_llm = llm is not None
    self.cfg = model_config(tc, self.tok, llm.config if llm else None)
    validate(tc, self.cfg, self.frozen_llm)
    images, items, cells = digits_vqa.training_set(tc.data, tc.train_images, tc.seed,
                                                   tc.turns_per_category, with_labels=True)
    self.pixels = pixel_values(images)
    self.cells = cells.reshape(len(cells), -1)
    enc = Encoder(self.tok, self.cfg.num_image_tokens, self.cfg.image_token_id)
    self.ids, self.target, self.key = encode_training_set(enc, items, tc.seed,
                                                          self.tok.pad_token_id, tc.data.grid)
    # The first of a split (the aux head once drew the second): the measured runs' init.
    key = jax.random.split(jax.random.key(tc.seed))[0]
    params = init_params(self.cfg, key, llm.params if llm else None, tc.pos_init)
    train = {"params": params, "aux": init_aux_head(self.cfg, tc)}
    if tc.lora_rank:
      train["lora"] = init_lora(params["llm"]["layers"], tc.lora_rank, jax.random.key(tc.seed + 1))
    tx = optimizer(tc, self.frozen_llm)
    self.state = {**train, "opt_state": tx.init(train)}
    self.digit_ids = tuple(self.tok.convert_tokens_to_ids([str(d) for d in range(10)]))
    n_targets = int(self.target[:, 1:].sum(1).max())
    self.train_step = make_train_step(self.cfg, tc, self.digit_ids, tx, self.frozen_llm, n_targets)

  def step(self, step: int) -> dict:
    rows = batch_rows(self.tc, step, len(self.ids))
    self.state, loss, metrics = self.train_step(
        self.state, self.ids[rows], self.target[rows], self.key[rows], self.pixels[rows],
        self.cells[rows])
    return {"step": step, "loss": float(loss), **{k: float(v) for k, v in metrics.items()}}

  def save_model(self, out: Path) -> Path:
    """The converted-format folder, with the tokenizer and processor files beside the params."""
    proc = llava_processor(self.tok, self.cfg.vision.image_size, self.cfg.vision.patch_size)
    with tempfile.TemporaryDirectory(prefix="jaxmm-vlm-proc-") as tmp:
      proc.save_pretrained(tmp)
      files = sorted(Path(tmp).iterdir())
      params = jax.device_get(self.state["params"])
      if "lora" in self.state:  # the saved decoder is the adapted one: a plain llama
        llm = params["llm"]
        params["llm"] = {**llm, "layers": jax.device_get(lora_merge(llm["layers"],
                                                                    self.state["lora"]))}
      return checkpoint.save_model(out, "llava", self.cfg.to_dict(), params, files, overwrite=True)


def _log(path: Path, rec: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(rec) + "\n")


def _resume(r: Run, ckpt: checkpoint.TrainCheckpointer, log: Path) -> int:
  """Restores the latest checkpoint if there is one; returns the first step still to run."""
  got = ckpt.restore_latest(r.state)
  if got is None:
    log.unlink(missing_ok=True)
    return 1
  step, r.state, _ = got
  if log.exists():  # drop log lines of steps that will be redone
    keep = [l for l in log.read_text().splitlines() if json.loads(l).get("step", 0) <= step]
    log.write_text("".join(l + "\n" for l in keep))
  print(f"resumed from step {step} ({ckpt.directory})", flush=True)
  return step + 1


def _check_same_config(out: Path, tc: TrainConfig, llm_dir) -> None:
  """A resumed run must continue the same configuration."""
  f = out / "train_config.json"
  want = {"config": tc.to_dict(), "llm": str(llm_dir) if llm_dir else None}
  if f.exists() and json.loads(f.read_text()) != want:
    raise JaxmmError(f"{out} holds a run with another configuration ({f}); use a new --out")
  checkpoint.write_json(f, want)   # atomic: a kill never leaves a truncated config behind


def train(tc: TrainConfig, out, llm_dir=None, kill_at_step=None, progress=True) -> Path:
  """Trains (resuming from OUT/ckpt when present) and writes OUT/model; returns that folder."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  _check_same_config(out, tc, llm_dir)
  r = Run(tc, llm_dir)
  log, ckpt = out / "log.jsonl", checkpoint.TrainCheckpointer(out / "ckpt", max_to_keep=2)
  start = _resume(r, ckpt, log)
  bar = tqdm(range(start, tc.steps + 1), initial=start - 1, total=tc.steps, desc="train vlm",
             disable=not progress)
  t0, c0 = time.perf_counter(), time.process_time()
  for step in bar:
    rec = r.step(step)
    if step % tc.log_every == 0 or step == tc.steps:
      rec.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
      _log(log, rec)
      bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['answer_token_acc']:.3f}")
    if step % tc.ckpt_every == 0 or step == tc.steps:
      ckpt.save(step, r.state)
    if kill_at_step == step:  # test hook: a real kill, no cleanup
      os.kill(os.getpid(), signal.SIGKILL)
  ckpt.close()
  return r.save_model(out / "model")


def ensure_model(cache_dir, tc: TrainConfig | None = None, progress=True) -> Path:
  """The model folder for `tc` (default preset) under `cache_dir`, trained when not cached.

  The folder name carries a fingerprint of the config, so a changed preset retrains.
  """
  tc = tc or default()
  out = Path(cache_dir) / f"digits-vlm-{fingerprint(tc)}"
  model = out / "model"
  if (model / checkpoint.META).is_file():
    return model
  return train(tc, out, progress=progress)


# ---- command line --------------------------------------------------------------------------------

_OVERRIDES = ("steps", "batch_size", "lr", "warmup", "seed", "ckpt_every", "train_images",
              "turns_per_category", "lora_rank",
              "text_layers", "text_width", "vision_layers", "vision_width")


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", required=True, help="run folder (ckpt/, log.jsonl, model/)")
  p.add_argument("--preset", choices=sorted(PRESETS), default="default")
  p.add_argument("--llm", help="converted llama folder used as a frozen decoder (e.g. SmolLM2)")
  for name in _OVERRIDES:
    kind = float if name in ("lr",) else int
    p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"override the preset's {name}")
  # Test hook: SIGKILL this process right after that step.
  p.add_argument("--kill-at-step", type=int, help=argparse.SUPPRESS)


def config_from_args(args) -> TrainConfig:
  tc = PRESETS[args.preset]()
  over = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
  return dataclasses.replace(tc, **over)


def run(args) -> int:
  tc = config_from_args(args)
  model = train(tc, args.out, args.llm, args.kill_at_step)
  print(f"wrote {model}")
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
