"""CADIT configuration: one frozen dataclass, presets as functions.

Every choice the spec marks [recon] is a field here, so it can be corrected once the paper's
equations are available (see ../shared/specs/cadit.md). Field comments cite the spec section.
"""
import dataclasses

from jaxmm.errors import ConfigError

METHODS = ("cadit", "source-only", "dann")
D_MODES = ("concat", "projection", "joint2k")  # §2: label maps, projection D, 2K-way head
GAN_LOSSES = ("bce", "lsgan")  # §3.3
SP_MODES = ("label", "feature")  # §3.2
CC_MODES = ("soft", "hard")  # §3.4


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyper-parameters of CADIT and its baselines (source-only, DANN) on 32x32 grey digits."""
  method: str = "cadit"
  image_size: int = 32
  channels: int = 1
  num_classes: int = 10
  # Networks (§2).
  gen_width: int = 64  # conv7x7-w, then 2w, 4w (8x8), residual blocks of 4w
  gen_blocks: int = 6
  gen_skip: float = 0.0  # > 0: residual translator tanh(G(x) + gen_skip * x), identity at init
  disc_width: int = 64  # conv4x4 s2 w, 2w, 4w, conv4x4 -> logit
  cls_widths: tuple = (20, 50, 500)  # ADDA LeNet: conv-20, conv-50, FC-500
  dom_width: int = 500  # DANN domain head (ADDA's 500-500 discriminator)
  d_mode: str = "concat"
  bidirectional: bool = True
  # Losses (§3).
  gan_loss: str = "bce"
  sp_mode: str = "label"
  cc_mode: str = "soft"
  tau: float = 0.9  # pseudo-label confidence threshold
  lam_sp: float = 1.0
  lam_cyc: float = 10.0
  lam_adv: float = 1.0
  lam_cc: float = 1.0  # ramped 0 -> lam_cc
  lam_pl: float = 1.0  # ramped 0 -> lam_pl
  lam_idt: float = 1.0  # unidirectional identity L1 (§3.4)
  lam_feat: float = 0.0  # > 0: feature-level adversarial term on C_t (CyCADA-style, §8), bidirectional
  ramp_frac: float = 0.2  # label-conditioning beta and lam_cc/lam_pl ramps span this share of steps
  sp_to_cls: bool = False  # §3.1 flag: let L_cls reach G_st (no stop-gradient)
  # Ablation switches (issue 7, point 2).
  use_sp: bool = True
  joint_adv: bool = True  # False: D always sees the uniform label (unconditional D)
  use_cc: bool = True
  use_pl: bool = True
  infer_ensemble: bool = False  # §4.4: average C_t(xt) with C_s(G_ts(xt))
  # Optimisation (§4).
  batch: int = 64
  steps: int = 40_000  # adaptation steps
  pretrain_steps: int = 1_250  # ~10 epochs of 8k source images at batch 64
  lr_pre: float = 1e-3
  lr_gan: float = 2e-4
  lr_cls: float = 2e-4
  dann_gamma: float = 10.0  # lambda(p) = 2 / (1 + exp(-gamma p)) - 1 (Ganin and Lempitsky)
  dann_lam: float = 1.0

  def __post_init__(self):
    for name, allowed in (("method", METHODS), ("d_mode", D_MODES), ("gan_loss", GAN_LOSSES),
                          ("sp_mode", SP_MODES), ("cc_mode", CC_MODES)):
      if getattr(self, name) not in allowed:
        raise ConfigError(f"{name}={getattr(self, name)!r}; choose one of {allowed}")
    if self.image_size % 8 or self.image_size < 16:
      raise ConfigError(f"image_size={self.image_size}: must be a multiple of 8, at least 16")
    if min(self.batch, self.steps, self.pretrain_steps) < 1:
      raise ConfigError("batch, steps and pretrain_steps must be positive")

  @property
  def total_steps(self) -> int:
    return self.pretrain_steps + self.steps

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["cls_widths"] = list(self.cls_widths)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "Config":
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
      raise ConfigError(f"unknown CADIT config keys {unknown}")
    d = dict(d)
    if "cls_widths" in d:
      d["cls_widths"] = tuple(d["cls_widths"])
    return cls(**d)

  def override(self, assignments) -> "Config":
    """Applies `key=value` strings (CLI `--set`), parsing values by the field's type."""
    fields = {f.name: f for f in dataclasses.fields(self)}
    changes = {}
    for item in assignments:
      key, sep, raw = item.partition("=")
      if not sep or key not in fields:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with KEY in {sorted(fields)}")
      changes[key] = _parse(raw, getattr(self, key), key)
    return dataclasses.replace(self, **changes)


def _parse(raw: str, current, key):
  if isinstance(current, bool):
    if raw.lower() not in ("true", "false", "1", "0"):
      raise ConfigError(f"--set {key}={raw}: expected true or false")
    return raw.lower() in ("true", "1")
  if isinstance(current, tuple):
    return tuple(int(v) for v in raw.split(","))
  try:
    return type(current)(raw)
  except ValueError:
    raise ConfigError(f"--set {key}={raw}: expected a {type(current).__name__}") from None


def digits() -> Config:
  """The spec's digits setting (§2, §4): CycleGAN-size translators, 40k steps. GPU-sized."""
  return Config()


def digits_cpu() -> Config:
  """Narrow translators and a short schedule for 2 CPU cores, with the three changes that made
  the short schedule work on USPS->MNIST (seed 0 pilots, README): a residual translator that
  starts as the identity (gen_skip), LSGAN, and the feature-level term on C_t (lam_feat).
  1,800 adaptation steps: at 1,200 the MNIST->USPS margin over source-only was 9.9 points, and
  CADIT was still improving (README). Measured on 2 otherwise idle cores: a whole CADIT run
  (1,000 pre-training + 1,800 adaptation steps, ~0.6 s per adaptation step) takes 1,090-1,124 s;
  DANN ~95 s."""
  return Config(gen_width=16, gen_blocks=2, gen_skip=2.0, disc_width=32, gan_loss="lsgan",
                lam_feat=1.0, batch=32, steps=1_800, pretrain_steps=1_000)


def tiny() -> Config:
  """For tests: a few steps of very small networks."""
  return Config(gen_width=4, gen_blocks=1, disc_width=4, cls_widths=(4, 8, 16), dom_width=16,
                batch=8, steps=6, pretrain_steps=3, image_size=16)


PRESETS = {"digits": digits, "digits-cpu": digits_cpu, "tiny": tiny}
