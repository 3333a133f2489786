"""The resumable training loop shared by CADIT, source-only and DANN (spec §4).

A run folder holds:
  ckpt/          orbax checkpoints of the whole state (params, optimiser states, step, PRNG key)
                 with the data-stream positions and the run's identity in the JSON metadata
  grid_XXXXXX.png  source | translation pairs, every `grid_every` adaptation steps (CADIT)
  model/         the final params as a jaxmm model folder (family "cadit")
  results.json   target/source test accuracy, label-flip rate, iterations, wall time
A run killed at any point restarts from its last checkpoint with the same data order and RNG.
"""
import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxmm import checkpoint
from jaxmm.cadit import evaluate, steps
from jaxmm.cadit.config import Config
from jaxmm.data.digits import Domain, Stream
from jaxmm.errors import JaxmmError

FAMILY = "cadit"


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """What identifies a run: resuming with a different one is refused."""
  cfg: Config
  task: str
  seed: int

  def meta(self) -> dict:
    return {"config": self.cfg.to_dict(), "task": self.task, "seed": self.seed}


def _batch(source: Domain, target: Domain, streams) -> dict:
  i_s, i_t = streams[0].next(), streams[1].next()
  return {"xs": source.x_train[i_s], "ys": source.y_train[i_s], "xt": target.x_train[i_t]}


def _restore(ckpt, spec: RunSpec, state, streams):
  """-> (step, state, wall seconds so far): the latest checkpoint, checked to be this run's."""
  restored = ckpt.restore_latest(state)
  if restored is None:
    return 0, state, 0.0
  step, state, meta = restored
  mine = spec.meta()
  diff = sorted(k for k in mine if meta.get(k) != mine[k])
  if diff:
    raise JaxmmError(f"{ckpt.directory} holds a different run (differs in {diff}); "
                     "use another --out folder or delete it")
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
  checkpoint.save_model(out / "model", FAMILY, spec.meta(), params, overwrite=True)
  checkpoint.write_json(out / "results.json", results)
  return results


def load_model(path):
  """-> (Config, params, meta) from a model folder written by `finish`."""
  meta = checkpoint.read_meta(path)
  if meta["family"] != FAMILY:
    raise JaxmmError(f"{path} holds a {meta['family']!r} model, not a CADIT/digits one")
  cfg = Config.from_dict(meta["config"]["config"])
  return cfg, checkpoint.load_params(path), meta["config"]
