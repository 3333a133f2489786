"""On a 2 x 4 mesh of host devices, under each preset, every decoder family gives what one device
gives: forward logits (1e-5, fp32), every pruning method's picks, greedy generation.

Run by `test_mesh.py` in a subprocess started with 8 host devices (XLA_FLAGS), so the rest of
the suite keeps its single device. Single-device results are the oracle; the tiny models are
the parity tests' (their widths divide by the mesh axes, so the rules really split them).
"""
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

import jaxmm  # noqa: E402
from jaxmm import api, sharding  # noqa: E402
from jaxmm.checkpoint import save_model  # noqa: E402
from jaxmm.errors import JaxmmError  # noqa: E402
from jaxmm.pruning import schedule as schedule_lib  # noqa: E402

import qwen_tiny  # noqa: E402
import test_llava_next as next_tiny  # noqa: E402
from tiny_hf import llava_batch, tiny_llava  # noqa: E402

PRESETS = ("dp", "fsdp", "tp")


def schedules(m):
  """(forward, generation) schedules: every method in one forward (each at its own layer),
  random pruning in generation; none for a text-only model. M-RoPE keeps positions."""
  if m.family == "llama":
    return None, None
  pos = "preserve" if m.family == "qwen2_vl" else None
  return (schedule_lib.parse("divprune@0:10,entropy@1:6,fastv@2:3", pos),
          schedule_lib.parse("random@1:5", pos))


def _llava():
  _, cfg, params = tiny_llava()
  ids, mask, px = llava_batch(cfg)
  return api.Model("llava", cfg, params), dict(input_ids=ids, attention_mask=mask, pixel_values=px)


def _llava_next():
  _, cfg, params = next_tiny.tiny()
  return api.Model("llava_next", cfg, params), next_tiny.batch()


def _qwen(model_type):
  _, cfg, params = qwen_tiny.tiny_qwen(model_type)
  inputs = qwen_tiny.batch([[("image", (1, 8, 8))], [("image", (1, 4, 12))]], prefix=(3, 6))
  return api.Model("qwen2_vl", cfg, params), inputs


def _llama():
  m, inputs = _llava()
  ids = np.where(inputs["input_ids"] == m.config.image_token_id, 5, inputs["input_ids"])
  return (api.Model("llama", m.config.text, m.params["llm"]),
          dict(input_ids=ids, attention_mask=inputs["attention_mask"]))


MODELS = {"llava": _llava, "llava_next": _llava_next, "qwen2_vl": lambda: _qwen("qwen2_vl"),
          "qwen2_5_vl": lambda: _qwen("qwen2_5_vl"), "llama": _llama}


@pytest.fixture(scope="module", params=list(MODELS))
def single(request, tmp_path_factory):
  """(model on one device, inputs, its forward, its generation, its folder)."""
  m, inputs = MODELS[request.param]()
  folder = tmp_path_factory.mktemp(request.param) / "model"
  save_model(folder, m.family, m.config.to_dict(), m.params)
  fwd_s, gen_s = schedules(m)
  fwd = api.forward(m, **inputs, schedule=fwd_s)
  gen = api.generate(m, **inputs, max_new_tokens=4, schedule=gen_s, return_kept=True)
  return m, inputs, fwd, gen, folder


@pytest.mark.parametrize("preset", PRESETS)
def test_mesh_gives_the_single_device_results(single, preset):
  m, inputs, fwd, (tokens, kept, _), folder = single
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 4), ("data", "model"))   # explicit axes, as users make them
  ms = api.load(folder, mesh=mesh, sharding=preset)
  assert ms.mesh is not None and ms.sharding == preset
  fwd_s, gen_s = schedules(m)
  out = api.forward(ms, **inputs, schedule=fwd_s)
  assert out.logits.sharding.spec[0] == "data"          # the batch ran split
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(fwd.logits), atol=1e-5, rtol=0)
  for a, b in zip(out.kept or (), fwd.kept or (), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  tok2, kept2, _ = api.generate(ms, **inputs, max_new_tokens=4, schedule=gen_s, return_kept=True)
  np.testing.assert_array_equal(tok2, tokens)
  for a, b in zip(kept2, kept, strict=True):
    np.testing.assert_array_equal(a, b)


# The split each preset must give, by the leaf's last path components (its role), written out
# here rather than derived from `sharding.spec`: the mesh has data=2, model=4.
TP_SPLIT = {"q/kernel": 4, "k/kernel": 4, "v/kernel": 4, "o/kernel": 4, "gate/kernel": 4,
            "up/kernel": 4, "down/kernel": 4, "fc1/kernel": 4, "fc2/kernel": 4, "qkv/kernel": 4,
            "proj/kernel": 4, "lm_head/kernel": 4, "embed": 4}


def _split(leaf) -> int:
  """How many pieces one device's shard is of the whole array."""
  return math.prod(leaf.shape) // math.prod(leaf.addressable_shards[0].data.shape)


def _flat(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flat(v, f"{prefix}{k}/")
  else:
    yield prefix[:-1], tree


@pytest.mark.parametrize("preset", PRESETS)
def test_large_matrices_are_split_as_the_preset_says(single, preset):
  m, _, _, _, folder = single
  vocab = getattr(m.config, "text", m.config).vocab_size
  ms = api.load(folder, mesh=jax.make_mesh((2, 4), ("data", "model")), sharding=preset)
  for path, leaf in _flat(ms.params):
    split = _split(leaf)
    if preset == "dp":
      assert split == 1, (path, split)
    elif leaf.ndim - ("layers/" in path or "blocks/" in path) < 2:
      assert split in (1, 8 if preset == "fsdp" else 4), (path, split)   # norms, biases
    elif preset == "fsdp":
      assert split == 8, (path, split)       # every matrix over all 8 devices
    else:
      role = next((r for r in TP_SPLIT if path == r or path.endswith("/" + r)), None)
      want = TP_SPLIT.get(role, 1)
      if role in ("embed", "lm_head/kernel") and vocab % 4:
        want = 1                               # a vocabulary the model axis does not divide
      assert split == want, (path, split, want)


def test_a_mesh_with_other_axis_names_is_a_one_line_error(single):
  _, _, _, _, folder = single
  with pytest.raises(JaxmmError, match="lack"):
    api.load(folder, mesh=jax.make_mesh((8,), ("x",)))


def test_presets_are_data():
  """The rules name mesh axes; model code never does (it names logical axes)."""
  assert set(sharding.PRESETS) == set(PRESETS)
  root = Path(jaxmm.__file__).parent
  for f in [*root.glob("models/*.py"), *root.glob("layers/*.py"), *root.glob("pruning/*.py")]:
    text = f.read_text()
    assert '"data"' not in text and '"model"' not in text and "PartitionSpec" not in text, f


def test_generate_command_on_a_mesh_prints_the_single_device_answer(tmp_path, capsys):
  from jaxmm import cli
  from jaxmm.converters.cli import convert_folder
  from tiny_hf import build_hf_folder, digit_png
  build_hf_folder(tmp_path / "hf")
  convert_folder(tmp_path / "hf", tmp_path / "jaxmm")
  digit_png(tmp_path / "digit.png")
  base = ["generate", "--model", str(tmp_path / "jaxmm"), "--image", str(tmp_path / "digit.png"),
          "--prompt", "what digit is this ?", "--max-new-tokens", "4",
          "--schedule", "divprune@0:20,random@1:8"]
  answers = []
  for extra in ([], ["--mesh", "data=1,model=8", "--sharding", "tp"],
                ["--mesh", "data=2,model=4", "--sharding", "fsdp"]):
    assert cli.main(base + extra) == 0
    answers.append(capsys.readouterr().out)
  assert answers[0] and answers[1] == answers[0] and answers[2] == answers[0]
  assert cli.main(base + ["--mesh", "data=2,model=2"]) == 2
  assert "does not match the 8 devices" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["fsdp", "tp"])
def test_convert_on_a_mesh_writes_the_rules_shardings_and_the_same_params(tmp_path, preset):
  from jaxmm import cli
  from jaxmm.converters import cli as convert_cli, common
  from jaxmm.converters.common import flatten
  from jaxmm.models import llava
  from tiny_hf import build_hf_folder
  build_hf_folder(tmp_path / "hf")
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "one")]) == 0
  assert cli.main(["convert", str(tmp_path / "hf"), str(tmp_path / "mesh"), "--mesh",
                   "data=2,model=4", "--sharding", preset]) == 0
  one = jaxmm.load(tmp_path / "one")
  mesh = jax.make_mesh((2, 4), ("data", "model"))
  want = flatten(sharding.param_specs(llava.rules(one.config), preset, {"data": 2, "model": 4}))
  ref = flatten(one.params)
  # The engine puts every tensor straight into its sharding as it streams...
  source = common.TensorSource.open(tmp_path / "hf")
  plan = convert_cli.planner(convert_cli.read_hf_config(tmp_path / "hf"), tmp_path)(
      convert_cli.read_hf_config(tmp_path / "hf"), source.names())
  placed = flatten(common.convert(source, plan.rules, ignore=plan.ignore, shardings=flatten(
      sharding.param_shardings(plan.rules, mesh, preset))))
  # ...and the folder it writes from those shards reads back in them.
  loaded = flatten(api.load(tmp_path / "mesh", mesh=mesh, sharding=preset).params)
  assert sorted(placed) == sorted(loaded) == sorted(want) == sorted(ref)
  assert sum(spec != jax.sharding.PartitionSpec() for spec in want.values()) > 10
  for path in want:
    for leaf in (placed[path], loaded[path]):
      assert leaf.sharding.spec == want[path], path
      np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref[path]))
