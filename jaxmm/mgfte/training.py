"""Optimiser, jitted train/predict steps, evaluation and model folders for MG-FTE (§4, §5)."""
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxmm import checkpoint
from jaxmm.errors import JaxmmError
from jaxmm.mgfte import metrics
from jaxmm.mgfte import model as model_lib
from jaxmm.mgfte.episodes import EpisodeSampler
from jaxmm.models import bert

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MODEL_KEYS = ("s_ids", "s_mask", "s_tags", "q_ids", "q_mask", "q_tags", "q_rel")


def _adam_l2(lr: float, weight_decay: float):
  """PyTorch Adam with weight_decay: the decay is added to the gradient before the moments
  (coupled L2). optax.adamw decouples it and is not equivalent."""
  return optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.scale_by_adam(0.9, 0.999, 1e-8), optax.scale(-lr))


def make_optimizer(enc_lr: float = 1e-5, head_lr: float = 1e-3, weight_decay: float = 1e-5):
  """Two groups: the BERT encoder at enc_lr, everything else (fusion, relation MLP, CRF) at head_lr."""
  labels = lambda params: {k: jax.tree.map(lambda _: "encoder" if k == "encoder" else "head", v)
                           for k, v in params.items()}
  return optax.multi_transform({"encoder": _adam_l2(enc_lr, weight_decay),
                                "head": _adam_l2(head_lr, weight_decay)}, labels)


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
  longest = max(int(batch["s_mask"].sum(-1).max()), int(batch["q_mask"].sum(-1).max()))
  cut = next((b for b in buckets if b >= longest), None)
  if cut is not None:
    arrays = {k: (v if k == "q_rel" else v[..., :cut]) for k, v in arrays.items()}
  return {k: jnp.asarray(v) for k, v in arrays.items()}


def make_train_step(bcfg, mcfg, tx):
  """A jitted step(params, opt_state, batch, rng) -> (params, opt_state, metrics)."""

  @jax.jit
  def step(params, opt_state, batch, rng):
    (loss, aux), grads = jax.value_and_grad(model_lib.loss_fn, has_aux=True)(
        params, bcfg, mcfg, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, **aux}

  return step


def make_predict(bcfg, mcfg):
  """A jitted predict(params, batch) -> (relation i32[B, NQ], tags i32[B, NQ, L])."""
  return jax.jit(functools.partial(model_lib.predict, bcfg=bcfg, cfg=mcfg))


def evaluate(predict, params, data, *, n_way, k_shot, n_query, episodes, seed, buckets=(),
             desc="eval", progress=True) -> dict:
  """Mean per-episode scores over `episodes` seeded B = 1 episodes (§5)."""
  sampler = EpisodeSampler(data, n_way, k_shot, n_query, batch=1, seed=seed)
  per_episode = []
  for _ in tqdm(range(episodes), desc=desc, disable=not progress, leave=False):
    batch = sampler.sample()
    rel, tags = jax.device_get(predict(params, batch=model_inputs(batch, buckets)))
    rows = batch["q_rows"][0]
    per_episode.append(metrics.episode_scores(
        tags[0], rel[0], batch["q_tags"][0], batch["q_rel"][0],
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


def save_extractor(out, bcfg, mcfg, params, tokenizer_dir, overwrite=True) -> None:
  """Writes a trained MG-FTE (encoder + head) as a self-contained folder for `jaxmm eval mgfte`."""
  cfg = {"bert": bcfg.to_dict(), "mgfte": mcfg.to_dict()}
  params = jax.tree.map(np.asarray, params)
  checkpoint.save_model(out, "mgfte", cfg, params, tokenizer_files(tokenizer_dir), overwrite)


def load_extractor(folder):
  """(bert.Config, mgfte Config, params) from a folder written by `save_extractor`."""
  meta = checkpoint.read_meta(folder)
  if meta["family"] != "mgfte":
    raise JaxmmError(f"{folder} is a {meta['family']!r} folder, not a trained MG-FTE model")
  bcfg = bert.Config.from_dict(meta["config"]["bert"])
  mcfg = model_lib.Config.from_dict(meta["config"]["mgfte"])
  return bcfg, mcfg, checkpoint.load_params(folder)
