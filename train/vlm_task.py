"""The digits-VQA task of `jaxmm.train.vlm`: its training data (conversations, pixels) and losses.

The answer loss is next-token cross-entropy on the answer tokens; the training-only signals
(per-patch digit loss, question probe, cell probe, attention grounding, early read-out) are
explained where they are defined. The decoder runs through the one prefill path
(`models.segments.prefill`); grounding reads its "attn_logp" capture. `tc` is the run's
`jaxmm.train.vlm.TrainConfig`.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmm import inputs
from jaxmm.config import LlavaConfig
from jaxmm.models import llama, llava, segments
from jaxmm.models.decoder import causal_mask
from jaxmm.pruning.state import TokenState
from jaxmm.train.trainer import lora_merge

# CLIP normalisation, as the saved CLIPImageProcessor applies it (pixels / 255, then these).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


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


# ---- losses --------------------------------------------------------------------------------------

def init_aux_head(cfg: LlavaConfig, tc) -> dict:
  """Training-only weights, never saved: a bias over the 10 digits for the per-cell loss (the
  rest is the LM head), the question-key probe and the visual tokens' cell probe."""
  n_keys = tc.data.grid ** 2 + 20
  return {"bias": jnp.zeros((10,)),
          "probe": jnp.zeros((cfg.text.hidden_size, n_keys)),
          "cell": jnp.zeros((cfg.text.hidden_size, tc.data.grid ** 2))}


def _unit_rms(x_BxNxD, eps: float):
  """x / RMS(x) over the last axis: an RMSNorm without its learned scale."""
  return x_BxNxD * jax.lax.rsqrt(jnp.mean(x_BxNxD ** 2, -1, keepdims=True) + eps)


def cell_loss(cfg: LlavaConfig, tc, head: dict, feats_BxVxD):
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


def aux_logits(cfg: LlavaConfig, tc, llm, head: dict, digit_ids, feats_BxVxD):
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


def cell_of_patch(tc) -> np.ndarray:
  """i32[V]: the grid cell of each patch, patches in row-major order."""
  g, side = tc.data.grid, tc.data.image_size // tc.patch_size
  r, c = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
  return ((r // (side // g)) * g + c // (side // g)).reshape(-1)


def ink_patches(tc, pixels_BxCxHxW):
  """bool[B, V]: the patches (row-major) that hold any ink, i.e. any pixel above background."""
  return ink_of_pixels(pixels_BxCxHxW, tc.patch_size)


def ink_of_pixels(pixels_BxCxHxW, p: int):
  """`ink_patches` for patch size p, from CLIP-normalised pixel values f32[B, 3, H, W]."""
  blank = -CLIP_MEAN[0] / CLIP_STD[0]
  b, _, h, w = pixels_BxCxHxW.shape
  ink = pixels_BxCxHxW[:, 0] > blank + 1e-3
  return ink.reshape(b, h // p, p, w // p, p).any((2, 4)).reshape(b, -1)


def cell_of_position(tc, ids_BxT, image_token_id: int):
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


def relevant_tokens(cfg: LlavaConfig, tc, ids_BxT, key_BxT, cells_BxC, pixels):
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


def informative_slots(cfg: LlavaConfig, tc, ids_BxT, pixels):
  """bool[B, S]: the visual tokens that show a digit (the ink patches with aux_pool "ink",
  else every visual token)."""
  cell = cell_of_position(tc, ids_BxT, cfg.image_token_id)           # [B, S]
  if tc.aux_pool != "ink":
    return cell >= 0
  idx = jnp.clip(jnp.cumsum(cell >= 0, axis=1) - 1, 0, None)
  return jnp.take_along_axis(ink_patches(tc, pixels), idx, axis=1) & (cell >= 0)


def grounding_loss(cfg: LlavaConfig, tc, logp_BxHxTxS, mask_BxTxS, ids_BxT,
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


def drop_blank(tc, rng: np.random.Generator, ids_BxT, pixels, image_token_id: int):
  """bool[B, T]: the visual slots a training step removes (`TrainConfig.drop_prob`). With
  probability drop_prob a conversation loses a fraction u ~ U(0, drop_max) of its blank (ink-free)
  visual tokens, chosen uniformly; ink tokens and text are never removed, so every answer stays
  determined by what is left. Host-side NumPy, drawn from the step's own generator."""
  ids_BxT = np.asarray(ids_BxT)
  dropped = np.zeros(ids_BxT.shape, bool)
  if not tc.drop_prob:
    return dropped
  blank = ~ink_patches(tc, np.asarray(pixels))   # [B, V]
  for b in range(len(ids_BxT)):
    if rng.random() >= tc.drop_prob:
      continue
    slots = np.flatnonzero(ids_BxT[b] == image_token_id)[blank[b]]
    n = int(round(rng.uniform(0.0, tc.drop_max) * len(slots)))
    dropped[b, rng.choice(slots, n, replace=False)] = True
  return dropped


def decoder_pass(cfg: LlavaConfig, tc, params, ids_BxT, feats_BxVxD, dropped_BxT=None):
  """The decoder over right-padded conversations through the one prefill path
  (`segments.prefill`, unpruned), with the captures the losses read. `dropped_BxT` (bool, or
  None): slots removed as a compacting pruning stage removes them, i.e. invisible as keys and
  skipped by the position ids. Returns (h f[B, T, D] leaving the last layer, hidden f[L, B, T, D]
  each layer's output or None, the "attn_logp" f32[B, H, T, S] of layer `ground_layer` or None)."""
  valid = ids_BxT != cfg.text.pad_token_id
  if dropped_BxT is not None:
    valid = valid & ~dropped_BxT
  x = llava.merge_image_features(cfg, llama.embed(cfg.text, params["llm"], ids_BxT), ids_BxT,
                                 feats_BxVxD)
  b, t = ids_BxT.shape
  state = TokenState(hidden=x, positions=inputs.positions_from_mask(valid), valid=valid,
                     visual=(ids_BxT == cfg.image_token_id) & valid,
                     origin=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
  stack = ("hidden",) if tc.probe_weight or tc.early_weight else ()
  probes = {tc.ground_layer: ("attn_logp",)} if tc.ground_weight else None
  dec = dataclasses.replace(llava.decoder(cfg), remat=True)   # see `llama.Decoder.remat`
  pre = segments.prefill(dec, params["llm"], state, (), None, stack=stack, probes=probes)
  logp = pre.probed[tc.ground_layer]["attn_logp"] if tc.ground_weight else None
  return pre.segments[-1].state.hidden, pre.stacked.get("hidden"), logp


def loss_fn(cfg: LlavaConfig, tc, digit_ids, train, ids_BxT, target_BxT, key_BxT,
            pixels, cells_BxC, dropped_BxT, frozen_llm: bool, n_targets: int | None = None):
  """Answer cross-entropy plus the weighted auxiliary losses; (loss, {metric: value}).

  ids/target/key [B, T] as `encode_training_set` gives them, pixels f32[B, 3, H, W], cells
  i32[B, G*G] the digit of each grid cell (row-major), dropped bool[B, T] the visual slots this
  step removes (`drop_blank`; all False without the augmentation). `train` holds "params",
  "aux" and, with LoRA, "lora". n_targets (static), when given, is at least the number of target
  tokens of any row: the LM head then runs on those positions only.
  """
  params = train["params"]
  if frozen_llm:  # no weight gradients for the LLM; activations still carry them to the vision
    params = {**params, "llm": jax.lax.stop_gradient(params["llm"])}
  if "lora" in train:
    llm = params["llm"]
    params = {**params, "llm": {**llm, "layers": lora_merge(llm["layers"], train["lora"])}}
  feats = llava.image_features(cfg, params, pixels)
  h, hidden, logp = decoder_pass(cfg, tc, params, ids_BxT, feats, dropped_BxT)
  probe = (probe_loss(cfg, train["aux"], hidden[tc.probe_layer - 1], key_BxT)
           if tc.probe_weight else jnp.zeros(()))
  kept = (ids_BxT != cfg.text.pad_token_id) & ~dropped_BxT
  ground = (grounding_loss(cfg, tc, logp, causal_mask(kept), ids_BxT, key_BxT, cells_BxC, pixels)
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
