"""Train MG-FTE (or the prototype baseline) on FewRel episodes; resumable, best-by-validation.

OUT receives ckpt/ (orbax, resumed automatically when present), log.jsonl (one line per logged
step), best/ (the extractor with the best validation triple F1, for `jaxmm eval mgfte`) and,
once the run is complete, final/ (the extractor of its last step).
"""
import argparse
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

import jaxmm.cli
from jaxmm import domain
from jaxmm.checkpoint import TrainCheckpointer, check_same_run, write_json
from jaxmm.data import fewrel
from jaxmm.errors import JaxmmError
from jaxmm.mgfte import adversarial, training
from jaxmm.mgfte import model as model_lib
from jaxmm.mgfte.episodes import EpisodeSampler, UnlabeledSampler
from jaxmm.models import bert


def add_args(p):
  p.add_argument("--model", help="encoder folder from `jaxmm convert` (bert family)")
  p.add_argument("--tiny", action="store_true", help="random 2-layer width-32 encoder (smoke tests)")
  p.add_argument("--tokenizer", help="tokenizer folder (default: --model)")
  p.add_argument("--out", required=True)
  p.add_argument("--variant", choices=("mgfte", "baseline"), default="mgfte")
  p.add_argument("--pool-mode", choices=("reference", "masked"), default="reference")
  p.add_argument("--train", default=fewrel.SPLITS["train"], help="split spec FILE[:REL,...]")
  p.add_argument("--val", default=fewrel.SPLITS["val"])
  p.add_argument("--max-per-relation", type=int, help="use only the first k instances per relation")
  p.add_argument("--steps", type=int, default=10000)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--n", type=int, default=5, help="N-way")
  p.add_argument("--k", type=int, default=5, help="K-shot")
  p.add_argument("--q", type=int, default=5, help="queries per class")
  p.add_argument("--enc-lr", type=float, default=1e-5)
  p.add_argument("--head-lr", type=float, default=1e-3)
  p.add_argument("--weight-decay", type=float, default=1e-5)
  p.add_argument("--val-episodes", type=int, default=500)
  p.add_argument("--eval-every", type=int, default=1000)
  p.add_argument("--ckpt-every", type=int, help="default: --eval-every")
  p.add_argument("--log-every", type=int, default=20)
  p.add_argument("--seed", type=int, default=3000)
  p.add_argument("--adv-mode", choices=("none",) + adversarial.MODES + ("dann",), default="none",
                 help="cross-domain term: a separate adversarial step (inverted, grl, reference) "
                      "or jaxmm's joint objective (dann: GRL with DANN's ramp + variance floor)")
  p.add_argument("--adv-weight", type=float, default=1.0,
                 help="dann: the largest gradient-reversal weight (reached by DANN's ramp)")
  p.add_argument("--var-floor", type=float, default=1.0,
                 help="dann: weight of the target features' variance floor (0 = off)")
  p.add_argument("--disc-lr", type=float,
                 help="dann: the discriminator's own Adam learning rate (default: --head-lr)")
  p.add_argument("--unlabeled", default=fewrel.SPLITS["unlabeled_pubmed"])
  p.add_argument("--length-buckets", default="48,64,90",
                  help="cut each batch to the smallest of these lengths holding it (exact; '' = off)")
  p.add_argument("--val-n", type=int, default=5, help="validation N-way")
  p.add_argument("--val-k", type=int, default=5, help="validation K-shot")
  # Test hook: SIGKILL this process right after that step (a real kill, no cleanup).
  p.add_argument("--kill-at-step", type=int, help=argparse.SUPPRESS)


def _encoder(args, key):
  if args.tiny:
    cfg = bert.Config(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=37)
    return cfg, bert.init_params(cfg, key)
  if not args.model:
    raise JaxmmError("pass --model ENCODER_FOLDER (or --tiny)")
  return training.load_encoder(args.model)


def _fingerprint(batch) -> str:
  """Identifies the episode data of a step (for logs and the resume test)."""
  h = hashlib.sha1(batch["classes"].tobytes() + batch["q_rows"].tobytes() + batch["s_ids"].tobytes())
  return h.hexdigest()[:12]


class Run:
  """Everything one training run holds; `state` is the checkpointed pytree."""

  def __init__(self, args):
    if args.disc_lr is not None and args.adv_mode != "dann":   # before any data is read
      raise JaxmmError("--disc-lr applies to --adv-mode dann only")
    self.args, self.out = args, Path(args.out)
    self.tok_dir = args.tokenizer or args.model
    if not self.tok_dir:
      raise JaxmmError("--tiny needs --tokenizer FOLDER")
    tok = fewrel.load_tokenizer(self.tok_dir)
    self.train_data = fewrel.load_split(args.train, tok, max_per_relation=args.max_per_relation)
    self.val_data = fewrel.load_split(args.val, tok, max_per_relation=args.max_per_relation)
    # RBG keys: dropout masks compile several times faster than with threefry on CPU.
    key = jax.random.key(args.seed, impl="rbg")
    k_enc, k_head, k_adv, self.step_key = jax.random.split(key, 4)
    self.bcfg, enc = _encoder(args, k_enc)
    self.mcfg = model_lib.Config(variant=args.variant, pool_mode=args.pool_mode)
    params = {"encoder": enc, "head": model_lib.init_head(self.mcfg, self.bcfg.hidden_size, k_head)}
    self.joint = args.adv_mode == "dann"
    if self.joint:   # the discriminator: the head's optimiser group, or its own with --disc-lr
      params["disc"] = adversarial.init_discriminator(k_adv, self.bcfg.hidden_size)
    tx = training.make_optimizer(args.enc_lr, args.head_lr, args.weight_decay, args.disc_lr)
    self.train_step = (adversarial.make_joint_step(self.bcfg, self.mcfg, tx, args.var_floor)
                       if self.joint else training.make_train_step(self.bcfg, self.mcfg, tx))
    self.predict = training.make_predict(self.bcfg, self.mcfg)
    self.state = {"params": params, "opt_state": tx.init(params)}
    self.buckets = training.parse_buckets(args.length_buckets)
    self.sampler = EpisodeSampler(self.train_data, args.n, args.k, args.q, args.batch, args.seed)
    self.meta = {"best_f1": -1.0, "best_step": 0}
    self._init_adversarial(k_adv, tok)

  def _init_adversarial(self, key, tok):
    args = self.args
    self.adv_step = self.unlabeled = None
    if args.adv_mode == "none":
      return
    data = fewrel.load_unlabeled(args.unlabeled, tok)
    self.unlabeled = UnlabeledSampler(data, args.n * args.k, args.batch, args.seed + 1)
    if self.joint:   # the floor: half the initial encoder's spread on the first 256 sentences
      self.floor = adversarial.feature_floor(self.bcfg, self.mcfg, self.state["params"]["encoder"],
                                             data.ids[:256], data.mask[:256])
      return
    enc_tx, disc_tx = adversarial.encoder_optimizer(args.enc_lr, args.weight_decay), \
        adversarial.discriminator_optimizer()
    self.adv_step = adversarial.make_step(self.bcfg, args.adv_mode, enc_tx, disc_tx)
    self.state["adv"] = adversarial.init_state(key, self.state["params"], self.bcfg.hidden_size,
                                               enc_tx, disc_tx)

  def samplers_state(self) -> dict:
    s = {"train": self.sampler.state()}
    if self.unlabeled is not None:
      s["unlabeled"] = self.unlabeled.state()
    return s

  def restore_samplers(self, s: dict) -> None:
    self.sampler.set_state(s["train"])
    if self.unlabeled is not None:
      self.unlabeled.set_state(s["unlabeled"])

  def step(self, step: int) -> dict:
    """One main update (plus the adversarial one); dropout keys depend only on (seed, step)."""
    batch = self.sampler.sample()
    rng = jax.random.fold_in(self.step_key, step)
    st = self.state
    inputs = training.model_inputs(batch, self.buckets)
    if self.joint:
      tgt = self.unlabeled.sample()
      cut = training.bucket_cut(self.buckets, tgt["mask"])   # exact, as model_inputs
      tgt = {k: jax.numpy.asarray(v[:, :cut]) for k, v in tgt.items()}
      lam = np.float32(self.args.adv_weight * domain.dann_lambda(step, self.args.steps, 10.0))
      params, opt_state, m = self.train_step(st["params"], st["opt_state"], inputs, tgt, lam,
                                             self.floor, rng)
    else:
      params, opt_state, m = self.train_step(st["params"], st["opt_state"], inputs, rng)
    self.state = {**st, "params": params, "opt_state": opt_state}
    if self.adv_step is not None:
      m = {**m, **self._adversarial(batch, jax.random.fold_in(rng, 1))}
    return {"step": step, "data": _fingerprint(batch), **{k: float(v) for k, v in m.items()}}

  def _adversarial(self, batch, rng) -> dict:
    tgt = self.unlabeled.sample()
    # exact, as in training.model_inputs: positions past the longest sentence change nothing
    cut = training.bucket_cut(self.buckets, batch["s_mask"], tgt["mask"])
    flat = lambda x: x.reshape(-1, x.shape[-1])[:, :cut]
    params, adv, m = self.adv_step(self.state["params"], self.state["adv"],
                                   flat(batch["s_ids"]), flat(batch["s_mask"]),
                                   flat(tgt["ids"]), flat(tgt["mask"]), rng)
    self.state = {**self.state, "params": params, "adv": adv}
    return m

  def validate(self, step: int) -> dict:
    a = self.args
    scores = training.evaluate(self.predict, self.state["params"], self.val_data, n_way=a.val_n,
                               k_shot=a.val_k, n_query=a.q, episodes=a.val_episodes, seed=a.seed,
                               buckets=self.buckets, desc="validate")
    f1 = scores["triple"]["f1"]
    if f1 > self.meta["best_f1"]:
      self.meta.update(best_f1=f1, best_step=step)
      training.save_extractor(self.out / "best", self.bcfg, self.mcfg, self.state["params"],
                              self.tok_dir)
    return {"step": step, "val": scores, "best_f1": self.meta["best_f1"]}


def _log(path: Path, record: dict) -> None:
  with path.open("a") as f:
    f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, last_step: int) -> None:
  """Drops log lines of steps after the restored checkpoint (they will be redone)."""
  if path.exists():
    keep = [l for l in path.read_text().splitlines() if json.loads(l)["step"] <= last_step]
    path.write_text("".join(l + "\n" for l in keep))


def _resume(run: Run, ckpt: TrainCheckpointer, log: Path) -> int:
  """Restores the latest checkpoint, if any; returns the first step still to run."""
  got = ckpt.restore_latest(run.state)
  if got is None:
    log.unlink(missing_ok=True)
    return 1
  step, run.state, meta = got
  run.restore_samplers(meta.pop("samplers"))
  run.meta = meta
  _truncate_log(log, step)
  print(f"resumed from step {step} ({ckpt.directory})")
  return step + 1


# Settings a resumed run may change: the length and cadence, and the test hook.
RESUMABLE_CHANGES = frozenset({"steps", "eval_every", "ckpt_every", "log_every", "kill_at_step"})


def _check_resumable(out: Path, args) -> None:
  """A folder holding checkpoints resumes only under the settings it was started with (before
  args.json is rewritten and before a checkpoint of another shape is read)."""
  saved = out / "args.json"
  if not (out / "ckpt").is_dir() or not saved.is_file():
    return
  ckpt = TrainCheckpointer(out / "ckpt")
  started = ckpt.latest_step() is not None
  ckpt.close()
  if started:
    mine = {k: v for k, v in json.loads(json.dumps(vars(args))).items()
            if k not in RESUMABLE_CHANGES}
    check_same_run(out, mine, json.loads(saved.read_text()))


def run(args) -> int:
  _check_resumable(Path(args.out), args)
  r = Run(args)
  r.out.mkdir(parents=True, exist_ok=True)
  write_json(r.out / "args.json", vars(args))   # atomic: a kill never truncates the run's record
  log = r.out / "log.jsonl"
  ckpt_every = args.ckpt_every or args.eval_every
  ckpt = TrainCheckpointer(r.out / "ckpt", max_to_keep=2)
  start = _resume(r, ckpt, log)
  bar = tqdm(range(start, args.steps + 1), initial=start - 1, total=args.steps, desc="train")
  t0 = time.perf_counter()
  for step in bar:
    rec = {**r.step(step), "wall_s": round(time.perf_counter() - t0, 3)}
    if step % args.log_every == 0 or step == args.steps:
      _log(log, rec)
      bar.set_postfix(loss=f"{rec['loss']:.3f}", rel=f"{rec['relation_loss']:.3f}",
                      ent=f"{rec['entity_loss']:.3f}")
    if step % args.eval_every == 0 or step == args.steps:
      _log(log, r.validate(step))
    if step % ckpt_every == 0 or step == args.steps:
      ckpt.save(step, r.state, {**r.meta, "samplers": r.samplers_state()})
    if args.kill_at_step == step:
      os.kill(os.getpid(), signal.SIGKILL)
  ckpt.close()
  # The last step's model too: comparisons without model selection (e.g. cross-domain) use it.
  training.save_extractor(r.out / "final", r.bcfg, r.mcfg, r.state["params"], r.tok_dir)
  print(json.dumps({"best_step": r.meta["best_step"], "best_val_triple_f1": r.meta["best_f1"]}))
  return 0


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
