"""PyTorch twins of the CADIT networks, named as converters/cadit.py expects (the test oracle)."""
import torch
from torch import nn
from torch.nn import functional as F


def _inorm(c):
  return nn.InstanceNorm2d(c, affine=True, eps=1e-5)


class ResBlock(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv1, self.norm1 = nn.Conv2d(c, c, 3, padding=1), _inorm(c)
    self.conv2, self.norm2 = nn.Conv2d(c, c, 3, padding=1), _inorm(c)

  def forward(self, x):
    return x + self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))


class Generator(nn.Module):
  def __init__(self, w, blocks, c, skip=0.0):
    super().__init__()
    self.skip = skip
    self.in_conv, self.in_norm = nn.Conv2d(c, w, 7, padding=3), _inorm(w)
    self.down0, self.down0_norm = nn.Conv2d(w, 2 * w, 3, 2, 1), _inorm(2 * w)
    self.down1, self.down1_norm = nn.Conv2d(2 * w, 4 * w, 3, 2, 1), _inorm(4 * w)
    for i in range(blocks):
      setattr(self, f"res{i}", ResBlock(4 * w))
    self.blocks = blocks
    self.up0 = nn.ConvTranspose2d(4 * w, 2 * w, 3, 2, padding=1, output_padding=1)
    self.up0_norm = _inorm(2 * w)
    self.up1 = nn.ConvTranspose2d(2 * w, w, 3, 2, padding=1, output_padding=1)
    self.up1_norm = _inorm(w)
    self.out_conv = nn.Conv2d(w, c, 7, padding=3)

  def forward(self, x):
    h = F.relu(self.in_norm(self.in_conv(x)))
    h = F.relu(self.down1_norm(self.down1(F.relu(self.down0_norm(self.down0(h))))))
    for i in range(self.blocks):
      h = getattr(self, f"res{i}")(h)
    h = F.relu(self.up1_norm(self.up1(F.relu(self.up0_norm(self.up0(h))))))
    return torch.tanh(self.out_conv(h) + self.skip * x)


class Discriminator(nn.Module):
  def __init__(self, w, k, c, mode, size):
    super().__init__()
    self.mode, self.k = mode, k
    cin = c + (k if mode == "concat" else 0)
    self.conv0 = nn.Conv2d(cin, w, 4, 2, 1)
    self.conv1, self.norm1 = nn.Conv2d(w, 2 * w, 4, 2, 1), _inorm(2 * w)
    self.conv2, self.norm2 = nn.Conv2d(2 * w, 4 * w, 4, 2, 1), _inorm(4 * w)
    if mode == "projection":
      self.embed, self.psi = nn.Linear(k, 4 * w, bias=False), nn.Linear(4 * w, 1)
    else:
      self.head = nn.Conv2d(4 * w, 2 * k if mode == "joint2k" else 1, size // 8)

  def forward(self, x, y):
    if self.mode == "concat":
      x = torch.cat([x, y[:, :, None, None].expand(-1, -1, *x.shape[2:])], 1)
    h = F.leaky_relu(self.conv0(x), 0.2)
    h = F.leaky_relu(self.norm1(self.conv1(h)), 0.2)
    h = F.leaky_relu(self.norm2(self.conv2(h)), 0.2)
    if self.mode == "projection":
      phi = h.sum((2, 3))
      return self.psi(phi)[:, 0] + (self.embed(y) * phi).sum(-1)
    out = self.head(h).flatten(1)
    return out if self.mode == "joint2k" else out[:, 0]


class LeNet(nn.Module):
  def __init__(self, widths, k, c, size):
    super().__init__()
    c1, c2, fc = widths
    s = ((size - 4) // 2 - 4) // 2
    self.conv1, self.conv2 = nn.Conv2d(c, c1, 5), nn.Conv2d(c1, c2, 5)
    self.fc1, self.fc2 = nn.Linear(c2 * s * s, fc), nn.Linear(fc, k)

  def forward(self, x):
    h = F.relu(F.max_pool2d(self.conv1(x), 2))
    h = F.relu(F.max_pool2d(self.conv2(h), 2))
    feat = F.relu(self.fc1(h.flatten(1)))
    return self.fc2(feat), feat


class DomainHead(nn.Module):
  def __init__(self, f, w):
    super().__init__()
    self.fc1, self.fc2, self.fc3 = nn.Linear(f, w), nn.Linear(w, w), nn.Linear(w, 1)

  def forward(self, f):
    return self.fc3(F.relu(self.fc2(F.relu(self.fc1(f)))))[:, 0]


class Cadit(nn.Module):
  """All roles of a jaxmm Config, so `state_dict()` is the full converter input."""

  def __init__(self, cfg):
    super().__init__()
    c, k, s = cfg.channels, cfg.num_classes, cfg.image_size
    for role in ("g_st", "g_ts"):
      setattr(self, role, Generator(cfg.gen_width, cfg.gen_blocks, c, cfg.gen_skip))
    for role in ("d_t", "d_s"):
      setattr(self, role, Discriminator(cfg.disc_width, k, c, cfg.d_mode, s))
    for role in ("c_s", "c_t"):
      setattr(self, role, LeNet(cfg.cls_widths, k, c, s))
    self.dom = DomainHead(cfg.cls_widths[2], cfg.dom_width)
