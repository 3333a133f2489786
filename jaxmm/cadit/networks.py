"""CADIT networks (spec §2): translators, joint (image, label) discriminators, LeNet classifiers.

Images are NHWC in [-1, 1]. Padding is explicit everywhere (never 'SAME') so that each layer has
the exact PyTorch twin the converter maps onto (torch pads stride-2 convs symmetrically).
Instance norm uses eps 1e-5 and the two-pass variance, as torch.nn.InstanceNorm2d does.
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmm.cadit.config import Config


def _pad(n):
  return ((n, n), (n, n))


def _inorm(name):
  return nn.InstanceNorm(epsilon=1e-5, use_fast_variance=False, name=name)


class ResBlock(nn.Module):
  """x + IN(conv3x3(relu(IN(conv3x3(x))))), channels preserved."""
  features: int

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.features, (3, 3), padding=_pad(1), name="conv1")(x)
    h = nn.relu(_inorm("norm1")(h))
    h = nn.Conv(self.features, (3, 3), padding=_pad(1), name="conv2")(h)
    return x + _inorm("norm2")(h)


class Generator(nn.Module):
  """CycleGAN/CyCADA-style translator: x_BxHxWxCin -> y_BxHxWxCout in [-1, 1] (tanh).

  skip > 0: y = tanh(out_conv(h) + skip * x) with out_conv initialised to 0, so the translator
  starts as (nearly) the identity and learns a residual (needs Cin == Cout).
  """
  width: int
  blocks: int
  out_channels: int
  skip: float = 0.0

  @nn.compact
  def __call__(self, x):
    w = self.width
    h = nn.relu(_inorm("in_norm")(nn.Conv(w, (7, 7), padding=_pad(3), name="in_conv")(x)))
    for i, f in enumerate((2 * w, 4 * w)):
      h = nn.Conv(f, (3, 3), strides=(2, 2), padding=_pad(1), name=f"down{i}")(h)
      h = nn.relu(_inorm(f"down{i}_norm")(h))
    for i in range(self.blocks):
      h = ResBlock(4 * w, name=f"res{i}")(h)
    for i, f in enumerate((2 * w, w)):
      # transpose_kernel=True gives torch's ConvTranspose2d (gradient of conv) semantics, and
      # padding (k-1-p, k-1-p+output_padding) = (1, 2) matches torch padding=1, output_padding=1.
      h = nn.ConvTranspose(f, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)),
                           transpose_kernel=True, name=f"up{i}")(h)
      h = nn.relu(_inorm(f"up{i}_norm")(h))
    init = nn.initializers.zeros if self.skip else nn.linear.default_kernel_init
    out = nn.Conv(self.out_channels, (7, 7), padding=_pad(3), kernel_init=init, name="out_conv")(h)
    return jnp.tanh(out + self.skip * x) if self.skip else jnp.tanh(out)


def label_maps(x_BxHxWxC, y_BxK):
  """Concatenates the (soft) label as K constant maps: -> BxHxWx(C+K)."""
  b, h, w, _ = x_BxHxWxC.shape
  maps = jnp.broadcast_to(y_BxK[:, None, None, :], (b, h, w, y_BxK.shape[-1]))
  return jnp.concatenate([x_BxHxWxC, maps.astype(x_BxHxWxC.dtype)], axis=-1)


class JointDiscriminator(nn.Module):
  """D(x, y) on image-label pairs.

  mode "concat": label maps on the input, global conv to one logit -> B.
  mode "projection": psi(phi(x)) + <E y, phi(x)> (Miyato and Koyama) -> B.
  mode "joint2k": no label input; a (domain x class) head -> Bx2K (Cicek and Soatto).
  """
  width: int
  num_classes: int
  mode: str = "concat"

  @nn.compact
  def __call__(self, x_BxHxWxC, y_BxK):
    h = label_maps(x_BxHxWxC, y_BxK) if self.mode == "concat" else x_BxHxWxC
    for i, f in enumerate((self.width, 2 * self.width, 4 * self.width)):
      h = nn.Conv(f, (4, 4), strides=(2, 2), padding=_pad(1), name=f"conv{i}")(h)
      h = nn.leaky_relu(h if i == 0 else _inorm(f"norm{i}")(h), 0.2)
    if self.mode == "projection":
      phi_BxF = h.sum(axis=(1, 2))
      embed_BxF = nn.Dense(phi_BxF.shape[-1], use_bias=False, name="embed")(y_BxK)
      return nn.Dense(1, name="psi")(phi_BxF)[:, 0] + (embed_BxF * phi_BxF).sum(-1)
    out = 2 * self.num_classes if self.mode == "joint2k" else 1
    logits = nn.Conv(out, h.shape[1:3], padding="VALID", name="head")(h)  # global: 1x1 output
    logits = logits.reshape(logits.shape[0], out)
    return logits if self.mode == "joint2k" else logits[:, 0]


class LeNet(nn.Module):
  """ADDA's LeNet: x_BxHxWxC -> (logits_BxK, features_BxF), F = widths[2].

  Features are flattened in NCHW order so the first FC layer is PyTorch's weight, transposed.
  """
  widths: tuple
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    c1, c2, fc = self.widths
    h = nn.Conv(c1, (5, 5), padding="VALID", name="conv1")(x)
    h = nn.relu(nn.max_pool(h, (2, 2), (2, 2)))
    h = nn.Conv(c2, (5, 5), padding="VALID", name="conv2")(h)
    h = nn.Dropout(0.5, deterministic=not train)(h)
    h = nn.relu(nn.max_pool(h, (2, 2), (2, 2)))
    h = h.transpose(0, 3, 1, 2).reshape(h.shape[0], -1)
    feat = nn.relu(nn.Dense(fc, name="fc1")(h))
    logits = nn.Dense(self.num_classes, name="fc2")(nn.Dropout(0.5, deterministic=not train)(feat))
    return logits, feat


class DomainHead(nn.Module):
  """DANN domain discriminator on classifier features: f_BxF -> logit_B (1 = source)."""
  width: int

  @nn.compact
  def __call__(self, f_BxF):
    h = nn.relu(nn.Dense(self.width, name="fc1")(f_BxF))
    h = nn.relu(nn.Dense(self.width, name="fc2")(h))
    return nn.Dense(1, name="fc3")(h)[:, 0]


class Nets(NamedTuple):
  """Module objects (stateless) for each role; params live in a dict keyed by the same names."""
  g_st: Generator
  g_ts: Generator
  d_t: JointDiscriminator
  d_s: JointDiscriminator
  c_s: LeNet
  c_t: LeNet
  dom: DomainHead


def build(cfg: Config) -> Nets:
  gen = Generator(cfg.gen_width, cfg.gen_blocks, cfg.channels, cfg.gen_skip)
  disc = JointDiscriminator(cfg.disc_width, cfg.num_classes, cfg.d_mode)
  cls = LeNet(tuple(cfg.cls_widths), cfg.num_classes)
  return Nets(gen, gen, disc, disc, cls, cls, DomainHead(cfg.dom_width))


def init_params(cfg: Config, key) -> dict:
  """All networks' params, {role: params}; every method carries every role (static tree)."""
  nets = build(cfg)
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
  y = jnp.zeros((1, cfg.num_classes), jnp.float32)
  keys = dict(zip(Nets._fields, jax.random.split(key, len(Nets._fields))))
  feat = jnp.zeros((1, cfg.cls_widths[2]), jnp.float32)
  args = {"g_st": (x,), "g_ts": (x,), "d_t": (x, y), "d_s": (x, y), "c_s": (x,), "c_t": (x,),
          "dom": (feat,)}
  return {name: getattr(nets, name).init(keys[name], *args[name])["params"]
          for name in Nets._fields}
