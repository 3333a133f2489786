"""PyTorch twins -> converter -> Flax: same outputs within 1e-5; export gives the state_dict back."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxmm.converters import cadit as conv  # noqa: E402
from jaxmm.cadit import config, networks  # noqa: E402
from jaxmm.errors import ConversionError  # noqa: E402
from cadit_torch_twins import Cadit  # noqa: E402  (tests/cadit is on sys.path)


def _cfg(d_mode, gen_skip=0.0):
  return dataclasses.replace(config.tiny(), d_mode=d_mode, gen_width=3, gen_blocks=2,
                             gen_skip=gen_skip)


def _inputs(cfg, n=3):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (n, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
  y = rng.dirichlet(np.ones(cfg.num_classes), n).astype(np.float32)
  return x, y


def _torch_outputs(model, x, y):
  xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(y)
  with torch.no_grad():
    logits, feat = model.c_t(xt)
    return {"g_st": model.g_st(xt).numpy().transpose(0, 2, 3, 1),
            "d_t": model.d_t(xt, yt).numpy(), "c_t": logits.numpy(),
            "dom": model.dom(feat).numpy()}


@functools.partial(jax.jit, static_argnums=0)
def _flax_outputs(cfg, params, x, y):
  nets = networks.build(cfg)
  logits, feat = nets.c_t.apply({"params": params["c_t"]}, x)
  return {"g_st": nets.g_st.apply({"params": params["g_st"]}, x),
          "d_t": nets.d_t.apply({"params": params["d_t"]}, x, y), "c_t": logits,
          "dom": nets.dom.apply({"params": params["dom"]}, feat)}


@pytest.mark.parametrize("d_mode,gen_skip", [("concat", 0.0), ("projection", 0.0),
                                             ("joint2k", 0.0), ("concat", 2.0)])
def test_torch_twins_match_and_export_roundtrips(d_mode, gen_skip):
  cfg = _cfg(d_mode, gen_skip)
  torch.manual_seed(0)
  model = Cadit(cfg).eval()
  for m in model.modules():  # non-trivial affine params for instance norm
    if isinstance(m, torch.nn.InstanceNorm2d):
      torch.nn.init.normal_(m.weight, 1.0, 0.3), torch.nn.init.normal_(m.bias, 0.0, 0.3)
  sd = model.state_dict()
  params = conv.from_state_dict(sd, cfg)
  ref = jax.eval_shape(functools.partial(networks.init_params, cfg), jax.random.key(0, impl="rbg"))
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, ref)
  x, y = _inputs(cfg)
  want, got = _torch_outputs(model, x, y), _flax_outputs(cfg, params, x, y)
  for k in want:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], atol=1e-5, rtol=0, err_msg=k)
  back = conv.to_state_dict(params, cfg)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


def test_converter_rejects_wrong_shapes_and_names():
  cfg = _cfg("concat")
  sd = {k: v.numpy() for k, v in Cadit(cfg).state_dict().items()}
  bad = dict(sd, **{"c_t.fc2.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ConversionError, match="c_t.fc2.weight"):
    conv.from_state_dict(bad, cfg)
  extra = dict(sd, **{"c_t.fc9.weight": np.zeros((3, 3), np.float32)})
  with pytest.raises(ConversionError, match="c_t.fc9.weight"):
    conv.from_state_dict(extra, cfg)
