"""Bad inputs to `jaxmm convert`: one `error:` line naming the problem, exit 2, no OUT left."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import jaxmm.cli
from hf_fixtures import hf_folder, layout_state_dict, tiny_llama, tiny_llava

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
  return tiny_llava(gqa=True, bias=True)


def run_convert(src, out, *flags):
  return jaxmm.cli.main(["convert", str(src), str(out), *flags])


def assert_fails_cleanly(capsys, src, tmp_path, *needles):
  out = tmp_path / "out"
  capsys.readouterr()  # drop what building the checkpoint printed
  rc = run_convert(src, out)
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2
  assert len(err) == 1 and err[0].startswith("error: "), err
  for needle in needles:
    assert needle in err[0], err[0]
  assert not out.exists()
  assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def edit_sd(model, fn):
  """The model's file-layout state dict after `fn` edited it (in place)."""
  sd = layout_state_dict(model, "hf")
  fn(sd)
  return sd


def test_missing_tensor(capsys, tmp_path, model):
  sd = edit_sd(model, lambda sd: sd.pop("language_model.model.layers.1.mlp.up_proj.weight"))
  src = hf_folder(tmp_path, model, "sharded", sd)
  assert_fails_cleanly(capsys, src, tmp_path, "missing tensor", "language_model.model.layers.1.mlp.up_proj.weight")


def test_extra_tensor(capsys, tmp_path, model):
  name = "language_model.model.layers.0.self_attn.rope_scale"
  sd = edit_sd(model, lambda sd: sd.update({name: torch.ones(4)}))
  src = hf_folder(tmp_path, model, "single", sd)
  assert_fails_cleanly(capsys, src, tmp_path, "unexpected tensor", name)


def test_wrong_shape(capsys, tmp_path, model):
  name = "language_model.model.layers.0.self_attn.k_proj.weight"
  sd = edit_sd(model, lambda sd: sd.update({name: torch.zeros(16, 16)}))
  src = hf_folder(tmp_path, model, "bin", sd)
  assert_fails_cleanly(capsys, src, tmp_path, name, "expected shape (8, 16), got (16, 16)")


def test_truncated_safetensors(capsys, tmp_path, model):
  src = hf_folder(tmp_path, model, "save_pretrained")
  f = src / "model.safetensors"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  assert_fails_cleanly(capsys, src, tmp_path, "model.safetensors is truncated")


def test_truncated_bin(capsys, tmp_path, model):
  src = hf_folder(tmp_path, model, "bin")
  f = src / "pytorch_model.bin"
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  assert_fails_cleanly(capsys, src, tmp_path, "pytorch_model.bin is not a readable PyTorch checkpoint")


def edit_config(src, fn):
  cfg = json.loads((src / "config.json").read_text())
  fn(cfg)
  (src / "config.json").write_text(json.dumps(cfg))


def test_unknown_model_type(capsys, tmp_path):
  src = hf_folder(tmp_path, tiny_llama(), "save_pretrained")
  edit_config(src, lambda c: c.update(model_type="mistral"))
  assert_fails_cleanly(capsys, src, tmp_path, "unknown model_type 'mistral'", "known: bert, llama, llava")


@pytest.mark.parametrize("edit,needle", [
    (lambda c: c["text_config"].update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4,
                                                        "factor": 4.0}), "rope_type='yarn'"),
    (lambda c: c["text_config"].update(hidden_act="relu"), "hidden_act='relu'"),
    (lambda c: c["text_config"].update(sliding_window=8), "sliding_window"),
    (lambda c: c.update(vision_feature_select_strategy="cls"), "vision_feature_select_strategy"),
])
def test_config_that_changes_the_math(capsys, tmp_path, model, edit, needle):
  src = hf_folder(tmp_path, model, "save_pretrained")
  edit_config(src, edit)
  assert_fails_cleanly(capsys, src, tmp_path, needle)


def test_missing_source_and_existing_out(capsys, tmp_path, model):
  assert_fails_cleanly(capsys, tmp_path / "nowhere", tmp_path, "does not exist")
  src = hf_folder(tmp_path, model, "save_pretrained")
  (tmp_path / "out").mkdir()
  capsys.readouterr()
  assert run_convert(src, tmp_path / "out") == 2
  assert "already exists" in capsys.readouterr().err
  assert run_convert(src, tmp_path / "out", "--overwrite", "--dtype", "bfloat16") == 0
  assert (tmp_path / "out" / "jaxmm.json").is_file()


def test_module_entry_point_in_a_subprocess(tmp_path):
  """`python -m jaxmm.converters.cli` as a user runs it: exit status and stderr are real."""
  src = hf_folder(tmp_path, tiny_llama(), "save_pretrained")
  f = src / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-1])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "jaxmm.converters.cli", str(src), str(tmp_path / "out")],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "is truncated: tensor" in r.stderr and not (tmp_path / "out").exists()
