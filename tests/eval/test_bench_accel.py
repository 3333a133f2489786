"""eval/bench_accel.py at a tiny shape on CPU: every figure is produced, the analytic ones by
their formulas, and transformers runs beside jaxmm in the same process."""
import json

import jax
import jax.numpy as jnp

from jaxmm.cli import module_main
from jaxmm.eval import bench_accel
from jaxmm.models import core


def test_tiny_llava_run_writes_every_figure(tmp_path, capsys):
  out = tmp_path / "b.json"
  assert module_main("jaxmm.eval.bench_accel", [
      "--scale", "tiny", "--models", "llava15_7b", "--attention", "dot", "--budgets", "64",
      "--decode-batches", "2", "--decode-tokens", "2", "--runs", "1", "--torch",
      "--out", str(out)]) == 0
  assert "| llava15_7b | dot |" in capsys.readouterr().out
  (row,) = json.loads(out.read_text())["rows"]
  assert row["visual_tokens"] == 64 and row["layers"] == 24 and row["dtype"] == "bfloat16"
  assert row["prefill_ms"] > 0 and 0 < row["mfu"] < 1 and row["compile_s"] > 0
  b = row["budgets"]["64"]
  # 64 of 576 -> 7.1 of 64 tokens averaged over 24 layers: floor((24 * 7.1 - 2 * 64) / 22) = 1
  assert b["schedule"] == "entropy@2:1"
  assert b["speedup"] > 0 and 0 < b["flops_ratio"] < 1
  # K/V of 24 layers x (tokens kept + 2 decoded) x 2 KV heads x 16 dims x 2 bytes, x 2 (K and V)
  per_token, n_text = 2 * 16 * 2 * 2, row["text_tokens"]
  assert row["kv_bytes"] == 24 * (n_text + 64 + 2) * per_token
  assert b["kv_bytes"] == (2 * (n_text + 64 + 2) + 22 * (n_text + 1 + 2)) * per_token
  assert row["decode_tokens_per_s"]["2"] > 0
  assert set(row["torch_prefill_ms"]) >= {"torch_sdpa"} and row["torch_prefill_ms"]["torch_sdpa"] > 0


def test_qwen_prompt_batches_per_image():
  name, cfg = bench_accel.model_config("qwen25_vl_7b", "tiny", "bfloat16", "xla")
  assert cfg.text.attention == "xla" and cfg.text.dtype == "bfloat16"
  one = bench_accel.prompt(name, cfg, "tiny")
  three = bench_accel.batched(name, one, 3)
  prep = core.prepare(name, cfg, three)
  assert list(prep.visual_B) == [16, 16, 16]                   # 112 px -> 8 x 8 patches / 4
  assert three["pixel_values"].shape[0] == 3 * one["pixel_values"].shape[0]
  params = bench_accel.random_params(name, cfg, "bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  fl = bench_accel.analytic_flops(name, cfg, params, int(prep.text_B[0]), 16, 64)
  assert fl > bench_accel.vision_flops(name, cfg, params, 64) > 0


def test_bad_arguments_are_one_line_errors(capsys):
  assert module_main("jaxmm.eval.bench_accel", ["--runs", "0"]) == 2
  assert capsys.readouterr().err.strip().startswith("error: --runs")
  if jax.default_backend() != "gpu":
    assert module_main("jaxmm.eval.bench_accel", ["--attention", "cudnn"]) == 2
    assert "needs a GPU backend" in capsys.readouterr().err
