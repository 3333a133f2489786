"""Training state, per-group Optax optimisers and the jitted update steps (spec §4, §5).

The state is a plain dict pytree (what orbax saves):
  params  {g_st, g_ts, d_t, d_s, c_s, c_t, dom}
  opt     {pre: C_s pre-training, d: discriminators, g: generators, c: classifiers + DANN head}
  step    int32 global step: [0, pretrain_steps) pre-trains C_s, then `steps` adaptation steps
  key     uint32[4] raw "rbg" PRNG key data, split inside the steps that need randomness
          (dropout). rbg, not threefry: XLA's CPU backend compiles threefry ~4x slower, which
          dominated compile time of these small networks.
Each step is a pure function state -> state that differentiates only its own group.
"""
import functools

import jax
import jax.numpy as jnp
import optax

from jaxmm.cadit import networks, objectives
from jaxmm.cadit.config import Config

FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
GROUPS = {"pre": ("c_s",), "d": ("d_t", "d_s"), "g": ("g_st", "g_ts"),
          "c": ("c_s", "c_t", "dom")}


def _decay(lr: float, steps: int):
  """Constant, then linear decay to 0 over the last half of the adaptation steps (§4)."""
  half = max(steps // 2, 1)
  return optax.join_schedules([optax.constant_schedule(lr),
                               optax.linear_schedule(lr, 0.0, steps - half)], [half])


def optimizers(cfg: Config) -> dict:
  return {"pre": optax.adam(cfg.lr_pre),
          "d": optax.adam(_decay(cfg.lr_gan, cfg.steps), b1=0.5, b2=0.999),
          "g": optax.adam(_decay(cfg.lr_gan, cfg.steps), b1=0.5, b2=0.999),
          "c": optax.adam(_decay(cfg.lr_cls, cfg.steps), b1=0.9, b2=0.999)}


def _group(params, name):
  return {k: params[k] for k in GROUPS[name]}


RNG_IMPL = "rbg"


@functools.partial(jax.jit, static_argnums=(0,))
def _init(cfg: Config, seed):
  key, init_key = jax.random.split(jax.random.key(seed, impl=RNG_IMPL))
  params = networks.init_params(cfg, init_key)
  opt = {name: tx.init(_group(params, name)) for name, tx in optimizers(cfg).items()}
  return {"params": params, "opt": opt, "step": jnp.zeros((), jnp.int32),
          "key": jax.random.key_data(key)}


def init_state(cfg: Config, seed: int) -> dict:
  return _init(cfg, jnp.asarray(seed, jnp.uint32))


def _update(tx, name, state, loss_fn):
  """One optimiser step on group `name`; loss_fn(full_params) -> (loss, metrics)."""
  sub = _group(state["params"], name)
  grad_fn = jax.value_and_grad(lambda s: loss_fn({**state["params"], **s}), has_aux=True)
  (_, metrics), grads = grad_fn(sub)
  updates, opt = tx.update(grads, state["opt"][name], sub)
  params = {**state["params"], **optax.apply_updates(sub, updates)}
  return {**state, "params": params, "opt": {**state["opt"], name: opt}}, metrics


def _split(state):
  key, sub = jax.random.split(jax.random.wrap_key_data(state["key"], impl=RNG_IMPL))
  return {**state, "key": jax.random.key_data(key)}, sub


@functools.lru_cache(maxsize=16)
def get(cfg: Config, fast_compile: bool = False) -> "Steps":
  """Shared Steps per config, so repeated runs in one process reuse the compiled functions."""
  return Steps(cfg, fast_compile)


class Steps:
  """The jitted steps for one config (`_t(state)`: adaptation step index, < 0 in pre-training)."""

  def __init__(self, cfg: Config, fast_compile: bool = False):
    self.cfg, self.nets, self.tx = cfg, networks.build(cfg), optimizers(cfg)
    # XLA's CPU backend spends most of a short run compiling; tests and smoke runs trade run
    # speed for ~3x faster compiles.
    opts = FAST_COMPILE if fast_compile else None
    for name in ("pretrain", "d_step", "g_step", "c_step", "dann_step", "source_step", "tr"):
      setattr(self, name, jax.jit(getattr(self, "_" + name), compiler_options=opts))

  def _t(self, state):
    return state["step"] - self.cfg.pretrain_steps

  def _tr(self, params, batch):
    return objectives.translations(self.cfg, self.nets, params, batch["xs"], batch["xt"])

  def _pretrain(self, state, batch):
    """C_s on labelled source (Adam lr_pre); the step that ends pre-training copies C_s to C_t."""
    state, rng = _split(state)
    loss_fn = lambda p: objectives.source_loss(self.nets, p, "c_s", batch, rng)
    state, metrics = _update(self.tx["pre"], "pre", state, loss_fn)
    step = state["step"] + 1
    done = step == self.cfg.pretrain_steps
    c_t = jax.tree.map(lambda s, t: jnp.where(done, s, t), state["params"]["c_s"],
                       state["params"]["c_t"])
    return {**state, "params": {**state["params"], "c_t": c_t}, "step": step}, metrics

  def _d_step(self, state, batch):
    """(a) discriminators on L_D; returns the translations the G and C steps reuse."""
    tr = self._tr(state["params"], batch)
    loss_fn = lambda p: objectives.d_loss(self.cfg, self.nets, p, batch, tr, self._t(state))
    state, metrics = _update(self.tx["d"], "d", state, loss_fn)
    return state, tr, metrics

  def _g_step(self, state, batch, tr):
    """(b) generators on their part of L_G, discriminators and classifiers fixed."""
    loss_fn = lambda p: objectives.g_loss(self.cfg, self.nets, p, batch, tr, self._t(state))
    return _update(self.tx["g"], "g", state, loss_fn)

  def _c_step(self, state, batch, tr):
    """(c) classifiers on L_cls + L_cc + L_pl over the D step's translations; advances step."""
    state, rng = _split(state)
    loss_fn = lambda p: objectives.c_loss(self.cfg, self.nets, p, batch, tr, self._t(state), rng)
    state, metrics = _update(self.tx["c"], "c", state, loss_fn)
    return {**state, "step": state["step"] + 1}, metrics

  def _dann_step(self, state, batch):
    state, rng = _split(state)
    loss_fn = lambda p: objectives.dann_loss(self.cfg, self.nets, p, batch, self._t(state), rng)
    state, metrics = _update(self.tx["c"], "c", state, loss_fn)
    return {**state, "step": state["step"] + 1}, metrics

  def _source_step(self, state, batch):
    state, rng = _split(state)
    loss_fn = lambda p: objectives.source_loss(self.nets, p, "c_t", batch, rng)
    state, metrics = _update(self.tx["c"], "c", state, loss_fn)
    return {**state, "step": state["step"] + 1}, metrics

  def cadit_step(self, state, batch):
    """D, then G, then C: three jitted updates sharing one batch and one set of translations."""
    state, tr, m_d = self.d_step(state, batch)
    state, m_g = self.g_step(state, batch, tr)
    state, m_c = self.c_step(state, batch, tr)
    return state, {**m_d, **m_g, **m_c}

  def step(self, state, batch, step: int):
    """Dispatches on the (host-side) global step and the method."""
    if step < self.cfg.pretrain_steps:
      return self.pretrain(state, batch)
    method = self.cfg.method
    if method == "cadit":
      return self.cadit_step(state, batch)
    return (self.dann_step if method == "dann" else self.source_step)(state, batch)


@functools.partial(jax.jit, static_argnums=(0,))
def predict_logits(cfg: Config, params, x):
  """Deployed prediction (§4.4): C_t(x), optionally averaged with C_s(G_ts(x)). -> BxK probs."""
  nets = networks.build(cfg)
  p = jax.nn.softmax(objectives.classify(nets, params, "c_t", x)[0])
  if cfg.infer_ensemble and cfg.bidirectional and cfg.method == "cadit":
    back = objectives.gen(nets, params, "g_ts", x)
    p = 0.5 * (p + jax.nn.softmax(objectives.classify(nets, params, "c_s", back)[0]))
  return p


@functools.partial(jax.jit, static_argnums=(0,))
def translate(cfg: Config, params, xs):
  return objectives.gen(networks.build(cfg), params, "g_st", xs)
