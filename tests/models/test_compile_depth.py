"""The prefill's program does not grow with depth (the layers are one scan per segment), so
neither does its compile time (`eval/bench_compile.py` measures it at the 7B shape)."""
import re

from jaxmm.eval import bench_compile
from jaxmm.models import core
from jaxmm import generation, inputs as inputs_lib
from tiny_hf import tiny_llava_config

TINY = tiny_llava_config()


def _program(layers: int, schedule: str) -> str:
  cfg = bench_compile.model_config(layers, "float32", TINY)
  params = bench_compile.abstract_params(cfg, "float32")
  inputs = bench_compile.prompt(cfg, text_tokens=6)
  prepared = core.prepare("llava", cfg, inputs)
  sched = core.resolve("llava", cfg, prepared, schedule or None)
  lowered = generation._prefill.lower("llava", cfg, params, prepared.arrays,
                                      inputs_lib.example_keys(0, 1), sched, 4)
  # The depth appears only as the leading dimension of the stacked weights and KV caches.
  return re.sub(r"\d+", "N", lowered.as_text())


def test_prefill_program_is_the_same_at_every_depth():
  for schedule in ("", "entropy@2:5"):
    assert _program(6, schedule) == _program(12, schedule), schedule


def test_bench_compile_runs_at_a_tiny_shape():
  cfg = bench_compile.model_config(4, "bfloat16", TINY)
  r = bench_compile.compile_seconds(cfg, bench_compile.abstract_params(cfg, "bfloat16"),
                                    bench_compile.prompt(cfg, 6), "divprune@0:8")
  assert set(r) == {"lower_s", "compile_s"} and r["compile_s"] > 0
