"""Optimiser, jitted train/predict steps, evaluation and model folders for MG-FTE (§4, §5).

This is also the `jaxmm.registry` module of family "mgfte": `Config` reads a trained folder's
config (`ExtractorConfig`) and `forward` decodes episodes, so `jaxmm.load` / `jaxmm.forward`
work on the folders `save_extractor` writes.
"""
import dataclasses
from pathlib import Path
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxmm import api, checkpoint
from jaxmm.errors import ConfigError, InputError, JaxmmError
from jaxmm.mgfte import metrics
from jaxmm.mgfte import model as model_lib
from jaxmm.mgfte.episodes import EpisodeSampler
from jaxmm.models import bert

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_KEYS = ("s_ids", "s_mask", "s_tags", "q_ids", "q_mask", "q_tags", "q_rel")
PREDICT_KEYS = MODEL_KEYS[:5]  # what a decode reads: the gold q_tags / q_rel are not used
FAMILY = "mgfte"


def _adam_l2(lr: float, weight_decay: float):
  """PyTorch Adam with weight_decay: the decay is added to the gradient before the moments
  (coupled L2). optax.adamw decouples it and is not equivalent."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.scale_by_adam(0.9, 0.999, 1e-8), optax.scale(-lr))


def make_optimizer(enc_lr: float = 1e-5, head_lr: float = 1e-3, weight_decay: float = 1e-5,
                   disc_lr: float | None = None):
  """Groups: the BERT encoder at enc_lr, everything else (fusion, relation MLP, CRF) at head_lr.
  With disc_lr, a params["disc"] subtree (the dann discriminator) gets its own group at disc_lr."""
  def group(k):
    if k == "encoder":
      return "encoder"
    return "disc" if k == "disc" and disc_lr is not None else "head"
  labels = lambda params: {k: jax.tree.map(lambda _: group(k), v) for k, v in params.items()}
  groups = {"encoder": _adam_l2(enc_lr, weight_decay), "head": _adam_l2(head_lr, weight_decay)}
  if disc_lr is not None:
    groups["disc"] = _adam_l2(disc_lr, weight_decay)
  return optax.multi_transform(groups, labels)


def parse_buckets(text: str) -> tuple:
  """"48,64,90" -> (48, 64, 90); "" -> () (always the full padded length)."""
  try:
    return tuple(sorted(int(x) for x in text.split(",") if x.strip()))
  except ValueError:
    raise JaxmmError(f"length buckets must be comma-separated integers, got {text!r}") from None


def model_inputs(batch: dict, buckets: tuple = ()) -> dict:
  """The arrays the model reads (drops host-side bookkeeping such as q_rows).

  With `buckets`, the position axis is cut to the smallest bucket that holds every real token
  of the batch. This is exact: positions past the batch's longest sentence influence nothing
  (test_model.py checks it for the reference pooling), and the reference itself truncates
  each batch to its longest sentence. Each bucket compiles once.
  """
  arrays = {k: batch[k] for k in MODEL_KEYS}
  cut = bucket_cut(buckets, batch["s_mask"], batch["q_mask"])
  arrays = {k: (v if k == "q_rel" else v[..., :cut]) for k, v in arrays.items()}
  return {k: jnp.asarray(v) for k, v in arrays.items()}


def bucket_cut(buckets: tuple, *masks) -> int:
  """The smallest bucket holding every real token of `masks` (i[..., L]); L if none does."""
  longest = max(int(m.sum(-1).max()) for m in masks)
  return _bucket(longest, buckets, masks[0].shape[-1])


def make_train_step(bcfg, mcfg, tx):
  """A jitted step(params, opt_state, batch, rng) -> (params, opt_state, metrics)."""

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, aux), grads = jax.value_and_grad(model_lib.loss_fn, has_aux=True)(
        params, bcfg, mcfg, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

  return step


@dataclasses.dataclass(frozen=True)
class Predictor:
  """Jitted evaluation pieces.
  encode(enc_params, ids i32[n, L], mask i32[n, L]) -> f[n, L, D] (no dropout);
  decode(head, hs f[1, N, K, L, D], hq f[1, NQ, L, D], batch) -> (relation, tags) as `predict`."""
  encode: Callable
  decode: Callable


def make_predict(bcfg, mcfg) -> Predictor:
  return Predictor(
      encode=jax.jit(lambda enc, ids, mask: model_lib.encode(bcfg, mcfg, enc, ids, mask)),
      decode=jax.jit(lambda head, hs, hq, batch: model_lib.predict_features(head, mcfg, hs, hq,
                                                                              batch)))


def _bucket(longest: int, buckets: tuple, full: int) -> int:
  return next((b for b in buckets if b >= longest), full)


def encode_rows(encode, enc_params, ids_RxL, mask_RxL, buckets=(), chunk=64) -> np.ndarray:
  """Features f32[R, W, D] of every row (W = the longest row; 0 past each row's end), encoded
  in length-sorted chunks of `chunk` rows cut to a bucket, so each bucket compiles once."""
  lengths = mask_RxL.sum(-1)
  width = int(lengths.max())
  order = np.argsort(lengths, kind="stable")
  out = None
  for i in range(0, len(order), chunk):
    rows = order[i:i + chunk]
    cut = _bucket(int(lengths[rows].max()), buckets, ids_RxL.shape[1])
    padded = np.concatenate([rows, np.repeat(rows[-1:], chunk - len(rows))])
    h = np.asarray(encode(enc_params, jnp.asarray(ids_RxL[padded, :cut]),
                          jnp.asarray(mask_RxL[padded, :cut])))[:len(rows)]
    if out is None:
      out = np.zeros((len(ids_RxL), width, h.shape[-1]), np.float32)
    w = min(cut, width)
    out[rows, :w] = h[:, :w]
  return out


def _fit(x, length: int):
  """Cut or zero-pad the position axis (-2) to `length`."""
  if x.shape[-2] >= length:
    return x[..., :length, :]
  pad = [(0, 0)] * x.ndim
  pad[-2] = (0, length - x.shape[-2])
  return np.pad(x, pad)


def predictions(predictor, params, data, *, n_way, k_shot, n_query, episodes, seed, buckets=(),
                desc="eval", progress=True):
  """Yields (episode batch, relation i32[NQ], tags i32[NQ, L]) for `episodes` seeded B = 1
  episodes.

  Every sentence the episodes draw is encoded once (a 10-way-10-shot episode would otherwise
  re-encode 150 sentences), then each episode is decoded from the gathered features.
  """
  draw = lambda: EpisodeSampler(data, n_way, k_shot, n_query, batch=1, seed=seed)
  sampler = draw()
  used = np.unique(np.concatenate(
      [np.concatenate([b["s_rows"].ravel(), b["q_rows"].ravel()])
       for b in (sampler.sample() for _ in range(episodes))]))
  feats = encode_rows(predictor.encode, params["encoder"], data.ids[used], data.mask[used],
                      buckets)
  index = np.zeros(len(data.ids), np.int64)
  index[used] = np.arange(len(used))
  sampler = draw()
  for _ in tqdm(range(episodes), desc=desc, disable=not progress, leave=False):
    batch = sampler.sample()
    inputs = model_inputs(batch, buckets)
    cut = inputs["q_ids"].shape[-1]
    hs, hq = (_fit(feats[index[batch[k]]], cut) for k in ("s_rows", "q_rows"))
    rel, tags = jax.device_get(predictor.decode(params["head"], hs, hq, inputs))
    yield batch, rel[0], tags[0]


def evaluate(predictor, params, data, **kw) -> dict:
  """Mean per-episode scores (§5); keywords as `predictions`."""
  per_episode = []
  for batch, rel, tags in predictions(predictor, params, data, **kw):
    rows = batch["q_rows"][0]
    per_episode.append(metrics.episode_scores(
        tags, rel, batch["q_tags"][0], batch["q_rel"][0],
        [data.pieces[r] for r in rows], [data.names[r] for r in rows]))
  return metrics.mean_scores(per_episode)


def load_encoder(folder):
  """(bert.Config, params) from a `jaxmm convert` folder of family bert."""
  meta = checkpoint.read_meta(folder)
  if meta["family"] != "bert":
    raise JaxmmError(f"{folder} holds a {meta['family']!r} model; MG-FTE needs a bert encoder")
  return bert.Config.from_dict(meta["config"]), checkpoint.load_params(folder)


def tokenizer_files(folder) -> list:
  return [Path(folder) / f for f in TOKENIZER_FILES if (Path(folder) / f).is_file()]


@dataclasses.dataclass(frozen=True)
class ExtractorConfig:
  """The config of a trained MG-FTE folder: its BERT encoder's and its head's. `to_dict` is the
  `config` of the folder's jaxmm.json; `from_dict` reads it back (unknown keys are an error)."""
  bert: bert.Config
  mgfte: model_lib.Config

  def to_dict(self) -> dict:
    return {"bert": self.bert.to_dict(), "mgfte": self.mgfte.to_dict()}

  @classmethod
  def from_dict(cls, d: dict) -> "ExtractorConfig":
    if sorted(d) != ["bert", "mgfte"]:
      raise ConfigError(f"an MG-FTE config holds the keys ['bert', 'mgfte'], not {sorted(d)}")
    return cls(bert.Config.from_dict(d["bert"]), model_lib.Config.from_dict(d["mgfte"]))


Config = ExtractorConfig  # the name `jaxmm.load` reads a family's folder config with


@flax.struct.dataclass
class ExtractorOutput:
  """relation i32[B, NQ]: each query's predicted class (0..N-1); tags i32[B, NQ, L]: its
  Viterbi tag path (entity decoder run on the predicted class)."""
  relation: jax.Array
  tags: jax.Array


_predict = jax.jit(model_lib.predict, static_argnums=(1, 2))


def forward(cfg: ExtractorConfig, params, **batch) -> ExtractorOutput:
  """`jaxmm.forward` for family "mgfte": the deterministic decode (`model.predict`) of B episodes.

  batch: s_ids, s_mask, s_tags i32[B, N, K, L] (support) and q_ids, q_mask i32[B, NQ, L]
  (queries); the gold q_tags and q_rel may be passed (as `model_inputs` gives them) and are
  ignored. Anything else, or a shape mismatch, is an InputError.
  """
  _check_batch(batch)
  rel, tags = _predict(params, cfg.bert, cfg.mgfte,
                       {k: jnp.asarray(batch[k]) for k in PREDICT_KEYS})
  return ExtractorOutput(relation=rel, tags=tags)


def _check_batch(batch: dict) -> None:
  missing = [k for k in PREDICT_KEYS if k not in batch]
  unknown = sorted(set(batch) - set(MODEL_KEYS))
  if missing or unknown:
    raise InputError(f"MG-FTE forward takes {', '.join(PREDICT_KEYS)} (q_tags, q_rel optional); "
                     f"missing {missing}, unknown {unknown}")
  s, q = np.shape(batch["s_ids"]), np.shape(batch["q_ids"])
  if not (len(s) == 4 and len(q) == 3 and s[0] == q[0] and s[3] == q[2]
          and np.shape(batch["s_mask"]) == np.shape(batch["s_tags"]) == s
          and np.shape(batch["q_mask"]) == q):
    shapes = ", ".join(f"{k} {list(np.shape(batch[k]))}" for k in PREDICT_KEYS)
    raise InputError(f"MG-FTE inputs must be support [B, N, K, L] and queries [B, NQ, L]; "
                     f"got {shapes}")


def save_extractor(out, bcfg, mcfg, params, tokenizer_dir, overwrite=True) -> None:
  """Writes a trained MG-FTE (encoder + head) as a self-contained folder of family "mgfte", for
  `jaxmm eval mgfte` and `jaxmm.load`."""
  params = jax.tree.map(np.asarray, params)
  checkpoint.save_model(out, FAMILY, ExtractorConfig(bcfg, mcfg).to_dict(), params,
                        tokenizer_files(tokenizer_dir), overwrite)


def load_extractor(folder):
  """(bert.Config, mgfte Config, params) from a folder written by `save_extractor`; the same
  reader as `jaxmm.load(folder, family="mgfte")`."""
  m = api.load(folder, family=FAMILY)
  return m.config.bert, m.config.mgfte, m.params
