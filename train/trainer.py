"""A generic Optax trainer: optimizer groups, LoRA, a donated jitted step, resumable runs.

A task (e.g. `jaxmm.train.vlm.Run`) holds its checkpointed pytree in `.state` and advances it with
`.step(step) -> {metric: float}`; `fit` drives it: resume from the run folder's last checkpoint,
log, checkpoint every few steps (atomically, through orbax), and survive a kill at any point.
"""
import json
import os
import signal
import time
from pathlib import Path
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import optax
from tqdm import tqdm

from jaxmm import checkpoint
from jaxmm.errors import JaxmmError


class Task(Protocol):
  state: dict

  def step(self, step: int) -> dict: ...


def adamw(lr: float, steps: int, warmup: int, schedule: str = "cosine", b2: float = 0.999,
          weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Global-norm clipping at 1, then AdamW on a linear warmup followed by "cosine" (to 2% of lr
  at `steps`) or "constant"."""
  total = max(steps, warmup + 1)
  if schedule == "cosine":
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total, lr * 0.02)
  elif schedule == "constant":
    sched = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)),
                                  optax.constant_schedule(lr)], [max(warmup, 1)])
  else:
    raise JaxmmError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, b1=0.9, b2=b2, weight_decay=weight_decay))


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


def make_step(loss_fn: Callable, tx: optax.GradientTransformation):
  """A jitted step(state, *batch) -> (state, loss, metrics) for loss_fn(train, *batch) ->
  (loss, metrics), where state = {**train, "opt_state": ...}. The old state's buffers are
  donated to the new one, so a step does not hold two copies of the params and moments."""
  def step(state, *batch):
    train = {k: v for k, v in state.items() if k != "opt_state"}
    (loss, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(train, *batch)
    updates, opt = tx.update(g, state["opt_state"], train)
    return {**optax.apply_updates(train, updates), "opt_state": opt}, loss, metrics
  return jax.jit(step, donate_argnums=0)


def check_same_config(out: Path, want: dict) -> None:
  """Writes OUT/train_config.json, or checks that a resumed run continues the same one."""
  f = Path(out) / "train_config.json"
  if f.exists() and json.loads(f.read_text()) != want:
    raise JaxmmError(f"{out} holds a run with another configuration ({f}); use a new --out")
  checkpoint.write_json(f, want)   # atomic: a kill never leaves a truncated config behind


def _log(path: Path, rec: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(rec) + "\n")


def resume(task: Task, ckpt: checkpoint.TrainCheckpointer, log: Path) -> int:
  """Restores the latest checkpoint if there is one; returns the first step still to run."""
  got = ckpt.restore_latest(task.state)
  if got is None:
    log.unlink(missing_ok=True)
    return 1
  step, task.state, _ = got
  if log.exists():  # drop log lines of steps that will be redone
    keep = [l for l in log.read_text().splitlines() if json.loads(l).get("step", 0) <= step]
    log.write_text("".join(l + "\n" for l in keep))
  print(f"resumed from step {step} ({ckpt.directory})", flush=True)
  return step + 1


def fit(task: Task, out, steps: int, ckpt_every: int, log_every: int, desc: str = "train",
        show=("loss",), kill_at_step=None, progress=True) -> None:
  """Runs steps 1..`steps` of `task` (from OUT/ckpt's last step when present), logging to
  OUT/log.jsonl (with wall and CPU seconds) and checkpointing every `ckpt_every` steps and at
  the end. `show`: metrics on the progress bar. `kill_at_step`: a test hook (SIGKILL)."""
  out = Path(out)
  log, ckpt = out / "log.jsonl", checkpoint.TrainCheckpointer(out / "ckpt", max_to_keep=2)
  start = resume(task, ckpt, log)
  bar = tqdm(range(start, steps + 1), initial=start - 1, total=steps, desc=desc,
             disable=not progress)
  t0, c0 = time.perf_counter(), time.process_time()
  for step in bar:
    rec = task.step(step)
    if step % log_every == 0 or step == steps:
      rec.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
      _log(log, rec)
      bar.set_postfix({k: f"{rec[k]:.3f}" for k in show})
    if step % ckpt_every == 0 or step == steps:
      ckpt.save(step, task.state)
    if kill_at_step == step:  # test hook: a real kill, no cleanup
      os.kill(os.getpid(), signal.SIGKILL)
  ckpt.close()
