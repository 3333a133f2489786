"""Name table: PyTorch CADIT networks <-> jaxmm params {g_st, g_ts, d_t, d_s, c_s, c_t, dom}.

The PyTorch layout this table expects (tests/cadit/torch_twins.py builds it) uses the Flax module
names, with the role as prefix: `g_st.res0.conv1.weight`, `d_t.head.weight`, `c_t.fc1.weight`...
  Conv2d weight OIHW            -> Conv kernel HWIO                     ("conv")
  ConvTranspose2d weight IOHW   -> ConvTranspose(transpose_kernel=True) kernel HW,O,I ("conv")
  Linear weight [out, in]       -> Dense kernel [in, out]               ("T")
  InstanceNorm2d(affine) weight -> scale
There is no BatchNorm (hence no batch_stats): LeNet has none and G / D use instance norm.
LeNet flattens its conv features in NCHW order, so `fc1` needs no permutation.
"""
import numpy as np

from jaxmm.converters.common import Rule, TensorSource, convert, export
from jaxmm.cadit.config import Config

ROLES = ("g_st", "g_ts", "d_t", "d_s", "c_s", "c_t", "dom")


def _conv(src, dst, cin, cout, k):
  return [Rule(f"{src}.weight", f"{dst}/kernel", (cout, cin, k[0], k[1]), "conv"),
          Rule(f"{src}.bias", f"{dst}/bias", (cout,))]


def _conv_t(src, dst, cin, cout, k):
  return [Rule(f"{src}.weight", f"{dst}/kernel", (cin, cout, k, k), "conv"),
          Rule(f"{src}.bias", f"{dst}/bias", (cout,))]


def _linear(src, dst, d_in, d_out, bias=True):
  rules = [Rule(f"{src}.weight", f"{dst}/kernel", (d_out, d_in), "T")]
  return rules + ([Rule(f"{src}.bias", f"{dst}/bias", (d_out,))] if bias else [])


def _norm(src, dst, c):
  return [Rule(f"{src}.weight", f"{dst}/scale", (c,)), Rule(f"{src}.bias", f"{dst}/bias", (c,))]


def generator_rules(cfg: Config, role: str) -> list[Rule]:
  w, c, p = cfg.gen_width, cfg.channels, f"{role}."
  rules = _conv(p + "in_conv", f"{role}/in_conv", c, w, (7, 7)) + _norm(p + "in_norm",
                                                                        f"{role}/in_norm", w)
  for i, (cin, cout) in enumerate(((w, 2 * w), (2 * w, 4 * w))):
    rules += _conv(f"{p}down{i}", f"{role}/down{i}", cin, cout, (3, 3))
    rules += _norm(f"{p}down{i}_norm", f"{role}/down{i}_norm", cout)
  for i in range(cfg.gen_blocks):
    for j in (1, 2):
      rules += _conv(f"{p}res{i}.conv{j}", f"{role}/res{i}/conv{j}", 4 * w, 4 * w, (3, 3))
      rules += _norm(f"{p}res{i}.norm{j}", f"{role}/res{i}/norm{j}", 4 * w)
  for i, (cin, cout) in enumerate(((4 * w, 2 * w), (2 * w, w))):
    rules += _conv_t(f"{p}up{i}", f"{role}/up{i}", cin, cout, 3)
    rules += _norm(f"{p}up{i}_norm", f"{role}/up{i}_norm", cout)
  return rules + _conv(p + "out_conv", f"{role}/out_conv", w, c, (7, 7))


def discriminator_rules(cfg: Config, role: str) -> list[Rule]:
  w, k, p = cfg.disc_width, cfg.num_classes, f"{role}."
  cin = cfg.channels + (k if cfg.d_mode == "concat" else 0)
  rules = []
  for i, cout in enumerate((w, 2 * w, 4 * w)):
    rules += _conv(f"{p}conv{i}", f"{role}/conv{i}", cin, cout, (4, 4))
    rules += _norm(f"{p}norm{i}", f"{role}/norm{i}", cout) if i else []
    cin = cout
  if cfg.d_mode == "projection":
    return (rules + _linear(p + "embed", f"{role}/embed", k, 4 * w, bias=False)
            + _linear(p + "psi", f"{role}/psi", 4 * w, 1))
  s = cfg.image_size // 8
  out = 2 * k if cfg.d_mode == "joint2k" else 1
  return rules + _conv(p + "head", f"{role}/head", 4 * w, out, (s, s))


def lenet_rules(cfg: Config, role: str) -> list[Rule]:
  c1, c2, fc = cfg.cls_widths
  s = ((cfg.image_size - 4) // 2 - 4) // 2  # two (conv5x5 VALID, maxpool 2) stages
  p = f"{role}."
  return (_conv(p + "conv1", f"{role}/conv1", cfg.channels, c1, (5, 5))
          + _conv(p + "conv2", f"{role}/conv2", c1, c2, (5, 5))
          + _linear(p + "fc1", f"{role}/fc1", c2 * s * s, fc)
          + _linear(p + "fc2", f"{role}/fc2", fc, cfg.num_classes))


def domain_rules(cfg: Config, role: str = "dom") -> list[Rule]:
  f, w = cfg.cls_widths[2], cfg.dom_width
  return (_linear(f"{role}.fc1", f"{role}/fc1", f, w) + _linear(f"{role}.fc2", f"{role}/fc2", w, w)
          + _linear(f"{role}.fc3", f"{role}/fc3", w, 1))


def rules(cfg: Config, roles=ROLES) -> list[Rule]:
  """The table for the given roles (all of them by default: the full training params tree)."""
  by_kind = {"g": generator_rules, "d": discriminator_rules, "c": lenet_rules}
  out = []
  for role in roles:
    out += domain_rules(cfg, role) if role == "dom" else by_kind[role[0]](cfg, role)
  return out


def from_state_dict(sd: dict, cfg: Config, roles=ROLES) -> dict:
  """PyTorch state_dict (tensors or arrays) -> jaxmm params {role: ...} (float32 numpy)."""
  return convert(TensorSource.from_state_dict(sd), rules(cfg, roles), dtype=np.float32)


def to_state_dict(params: dict, cfg: Config, roles=ROLES) -> dict:
  """jaxmm params -> PyTorch state_dict of numpy arrays (torch.from_numpy each to load)."""
  sub = {r: params[r] for r in roles}
  return export(jax_to_numpy(sub), rules(cfg, roles))


def jax_to_numpy(tree):
  if isinstance(tree, dict):
    return {k: jax_to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
