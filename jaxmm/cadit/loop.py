"""The resumable training loop shared by CADIT, source-only and DANN (spec §4).

A run folder holds:
  ckpt/          orbax checkpoints of the whole state (params, optimiser states, step, PRNG key)
                 with the data-stream positions and the run's identity in the JSON metadata
  grid_XXXXXX.png  source | translation pairs, every `grid_every` adaptation steps (CADIT)
  model/         the final params as a jaxmm model folder (family "cadit", see `save_model`)
  results.json   target/source test accuracy, label-flip rate, iterations, wall time
A run killed at any point restarts from its last checkpoint with the same data order and RNG.

This is also the `jaxmm.registry` module of family "cadit": a model folder's config is the
`RunSpec` of its run (`Config`), and `forward` classifies images with the deployed classifier,
so `jaxmm.load` / `jaxmm.forward` work on `model/`.
"""
import dataclasses
import time
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxmm import api, checkpoint
from jaxmm.cadit import config as config_lib
from jaxmm.cadit import evaluate, steps
from jaxmm.data.digits import Domain, Stream
from jaxmm.errors import ConfigError, InputError

FAMILY = "cadit"


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What identifies a run: resuming with a different one is refused. It is also the config of
  the run's model folder: `meta()` is the `config` of its jaxmm.json, `from_dict` reads it back."""
  cfg: config_lib.Config
  task: str
  seed: int

  def meta(self) -> dict:
    return {"config": self.cfg.to_dict(), "task": self.task, "seed": self.seed}

  to_dict = meta

  @classmethod
  def from_dict(cls, d: dict) -> "RunSpec":
    if sorted(d) != ["config", "seed", "task"]:
      raise ConfigError(f"a CADIT run spec holds the keys ['config', 'seed', 'task'], "
                        f"not {sorted(d)}")
    return cls(config_lib.Config.from_dict(d["config"]), d["task"], d["seed"])


Config = RunSpec  # the name `jaxmm.load` reads a family's folder config with


def _batch(source: Domain, target: Domain, streams) -> dict:
  i_s, i_t = streams[0].next(), streams[1].next()
  return {"xs": source.x_train[i_s], "ys": source.y_train[i_s], "xt": target.x_train[i_t]}


def _restore(ckpt, spec: RunSpec, state, streams):
  """-> (step, state, wall seconds so far): the latest checkpoint, checked to be this run's."""
  restored = ckpt.restore_latest(state)
  if restored is None:
    return 0, state, 0.0
  step, state, meta = restored
  checkpoint.check_same_run(ckpt.directory, spec.meta(), meta)
  for stream, st in zip(streams, meta["streams"]):
    stream.restore(st)
  return step, state, float(meta.get("wall_s", 0.0))


def _save(ckpt, spec, step, state, streams, wall):
  ckpt.save(step, state, {**spec.meta(), "streams": [s.state() for s in streams], "wall_s": wall})


def train(spec: RunSpec, source: Domain, target: Domain, out, *, ckpt_every: int = 500,
          grid_every: int = 500, stop_after: int | None = None, fast_compile: bool = False,
          log=print) -> dict | None:
  """Runs (or resumes) a run into folder `out`; returns results, or None if `stop_after`
  steps were taken first (the run is then resumable from its checkpoint)."""
  cfg, out = spec.cfg, Path(out)
  runner = steps.get(cfg, fast_compile)
  streams = [Stream(len(source.x_train), cfg.batch, spec.seed, 0),
             Stream(len(target.x_train), cfg.batch, spec.seed, 1)]
  ckpt = checkpoint.TrainCheckpointer(out / "ckpt", max_to_keep=2)
  start, state, prior_wall = _restore(ckpt, spec, steps.init_state(cfg, spec.seed), streams)
  if start:
    log(f"resumed from step {start} of {cfg.total_steps}")
  grid_src = source.x_test[evaluate.grid_indices(source.y_test)]
  t0, step = time.time(), start
  bar = tqdm(total=cfg.total_steps, initial=start, desc=f"{cfg.method} {spec.task}", unit="it")
  while step < cfg.total_steps:
    state, metrics = runner.step(state, _batch(source, target, streams), step)
    step += 1
    bar.update(1)
    if step % 50 == 0:
      bar.set_postfix({k: f"{float(v):.3f}" for k, v in metrics.items()})
    if step % ckpt_every == 0 or step == cfg.total_steps:
      _save(ckpt, spec, step, state, streams, prior_wall + time.time() - t0)
      log(f"checkpoint saved at step {step}")
    if cfg.method == "cadit" and step > cfg.pretrain_steps and (
        (step - cfg.pretrain_steps) % grid_every == 0 or step == cfg.total_steps):
      evaluate.write_grid(out / f"grid_{step:06d}.png", cfg, state["params"], grid_src)
    if stop_after is not None and step - start >= stop_after and step < cfg.total_steps:
      bar.close()
      ckpt.close()
      return None
  bar.close()
  wall = prior_wall + time.time() - t0
  ckpt.close()
  return finish(spec, source, target, out, state["params"], wall)


def finish(spec: RunSpec, source: Domain, target: Domain, out: Path, params, wall: float) -> dict:
  """Final evaluation (no model selection: the last step's params), model folder, results."""
  cfg = spec.cfg
  params = jax.device_get(params)
  results = {**spec.meta(), "iterations": cfg.total_steps, "adapt_steps": cfg.steps,
             "pretrain_steps": cfg.pretrain_steps, "wall_s": round(wall, 1),
             "target_acc": evaluate.accuracy(cfg, params, target.x_test, target.y_test),
             "source_acc": evaluate.accuracy(cfg, params, source.x_test, source.y_test)}
  if cfg.method == "cadit":
    results["label_flip_rate"] = evaluate.label_flip_rate(cfg, params, source.x_test,
                                                          source.y_test)
  save_model(out / "model", spec, params)
  checkpoint.write_json(out / "results.json", results)
  return results


def save_model(folder, spec: RunSpec, params) -> Path:
  """Writes `params` (the `params` of a `steps.init_state` state) of run `spec` as a model
  folder of family "cadit", replacing `folder` if it exists. `jaxmm.load` and `load_model`
  open it."""
  return checkpoint.save_model(folder, FAMILY, spec.to_dict(), jax.device_get(params),
                               overwrite=True)


def load_model(path):
  """-> (networks Config, params, run meta dict) from a folder written by `save_model`; the
  same reader as `jaxmm.load(path, family="cadit")`."""
  m = api.load(path, family=FAMILY)
  return m.config.cfg, m.params, m.config.meta()


@flax.struct.dataclass
class ClassifierOutput:
  """probs f32[B, K]: the deployed classifier's class probabilities (argmax: the prediction)."""
  probs: jax.Array


def forward(spec: RunSpec, params, *, images) -> ClassifierOutput:
  """`jaxmm.forward` for family "cadit": `steps.predict_logits` (C_t, or the §4.4 ensemble) of
  images f32[B, H, W, C] in [-1, 1], H = W = cfg.image_size, C = cfg.channels."""
  cfg = spec.cfg
  want = (cfg.image_size, cfg.image_size, cfg.channels)
  if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != want:
    raise InputError(f"CADIT images must be f32[B, {want[0]}, {want[1]}, {want[2]}] in [-1, 1]; "
                     f"got shape {list(np.shape(images))}")
  probs = steps.predict_logits(cfg, params, jnp.asarray(images, jnp.float32))
  return ClassifierOutput(probs=probs)
