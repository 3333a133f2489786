"""Converter peak memory: `jaxmm convert` of a ~300M-parameter LLaVA in 4 safetensors shards.

Builds a randomly initialised LLaVA (small CLIP + a LLaMA sized to ~300M parameters) with
transformers, saves it with `save_pretrained` in 4 shards, then runs the converter under
`/usr/bin/time -v` and compares its "Maximum resident set size" with the bytes of the params
it writes. The requirement is peak RSS < 2x the output's parameter bytes. The RSS of merely
importing the converter (python, numpy, jax, orbax) is measured the same way and reported
separately, as is the largest single tensor.

  python -m jaxmm.eval.convert_memory [--out results/convert_memory.json] [--dtype float32]
                                      [--mesh data=2,model=2 --sharding fsdp]

With --mesh the converter places each tensor on a mesh of host devices as it streams
(`jaxmm convert --mesh`). On the CPU backend those devices' buffers are host memory too, so the
peak then holds the placed model plus what the converter adds; on accelerators only the latter
is host memory.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from jaxmm.converters import common, llava
from jaxmm import checkpoint

TIME = "/usr/bin/time"


def build_checkpoint(folder: Path) -> None:
  """~300M random params: CLIP 224px/14, 4x256 + LLaMA 20x1024 (vocab 32000, untied), 4 shards."""
  import torch
  from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                            LlavaForConditionalGeneration)
  torch.manual_seed(0)
  vision = CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                            num_attention_heads=4, image_size=224, patch_size=14)
  text = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                     num_hidden_layers=18, num_attention_heads=16, num_key_value_heads=16)
  model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                    image_token_index=31999))
  model.save_pretrained(folder)  # config + the file layout of the tensor names
  save_sharded(folder, 4)


def save_sharded(folder: Path, k: int) -> None:
  """Re-splits folder/model.safetensors into `k` shards of about equal bytes plus the index.

  (`save_pretrained(max_shard_size=...)` packs greedily and cannot be asked for k shards.)
  """
  from safetensors.torch import load_file, save_file
  sd = load_file(folder / "model.safetensors")
  (folder / "model.safetensors").unlink()
  total, done, parts = sum(v.nbytes for v in sd.values()), 0, [[] for _ in range(k)]
  for name, v in sd.items():
    parts[min(k - 1, done * k // total)].append(name)
    done += v.nbytes
  weight_map = {}
  for j, names in enumerate(parts):
    fname = f"model-{j + 1:05d}-of-{k:05d}.safetensors"
    save_file({n: sd.pop(n) for n in names}, folder / fname, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(names, fname))
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _devices(mesh: str | None) -> int:
  from jaxmm import sharding
  return math.prod(sharding.parse_mesh(mesh).values()) if mesh else 1


def max_rss_bytes(cmd: list[str], cwd: Path, devices: int = 1) -> int:
  """Runs `cmd` under GNU time -v (on `devices` host devices); returns its peak RSS in bytes
  (raises if the command fails)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  if devices > 1:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  r = subprocess.run([TIME, "-v", *cmd], cwd=cwd, capture_output=True, text=True, env=env)
  if r.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
  m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
  return int(m.group(1)) * 1024


def param_bytes(src: Path, dtype: str) -> tuple[int, int, int]:
  """(number of params, bytes of the params written, bytes of the largest source tensor)."""
  hf_config = json.loads((src / "config.json").read_text())
  source = common.TensorSource.open(src)
  plan = llava.plan_llava(hf_config, source.names())
  n = sum(math.prod(r.out_shape()) for r in plan.rules)
  largest = max(math.prod(r.shape) for r in plan.rules) * 4
  return n, n * (2 if dtype == "bfloat16" else 4), largest


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="results/convert_memory.json")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--mesh", help="convert onto a mesh of host devices, e.g. data=2,model=2")
  parser.add_argument("--sharding", default="fsdp")
  args = parser.parse_args(argv)
  if not Path(TIME).exists():
    raise SystemExit(f"{TIME} (GNU time) is missing: apt-get install -y time")
  repo = Path(__file__).resolve().parents[1]
  with tempfile.TemporaryDirectory(prefix="jaxmm-convmem-") as tmp:
    src, out = Path(tmp) / "src", Path(tmp) / "out"
    build_checkpoint(src)
    n, nbytes, largest = param_bytes(src, args.dtype)
    shard = max(f.stat().st_size for f in src.glob("model-*.safetensors"))
    base = max_rss_bytes([sys.executable, "-c", "import jaxmm.converters.cli"], repo)
    mesh = ["--mesh", args.mesh, "--sharding", args.sharding] if args.mesh else []
    peak = max_rss_bytes([sys.executable, "-m", "jaxmm.converters.cli", str(src), str(out),
                          "--dtype", args.dtype, *mesh], repo, _devices(args.mesh))
  res = {"params": n, "dtype": args.dtype, "mesh": args.mesh,
         "sharding": args.sharding if args.mesh else None,
         "param_bytes": nbytes, "peak_rss_bytes": peak,
         "ratio": peak / nbytes, "import_rss_bytes": base,
         "ratio_without_import": (peak - base) / nbytes, "largest_shard_bytes": shard,
         "largest_tensor_bytes": largest, "shards": 4, "ok": peak < 2 * nbytes}
  mib = lambda b: f"{b / 2**20:8.1f} MiB"
  print(f"params            {n / 1e6:8.1f} M ({args.dtype})")
  for key in ("param_bytes", "peak_rss_bytes", "import_rss_bytes", "largest_shard_bytes",
              "largest_tensor_bytes"):
    print(f"{key:<18}{mib(res[key])}")
  print(f"peak / params     {res['ratio']:8.2f}x   (requirement < 2x: {'ok' if res['ok'] else 'FAIL'})")
  print(f"(peak - import) / params {res['ratio_without_import']:.2f}x")
  Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(args.out, res)
  return 0 if res["ok"] else 1


if __name__ == "__main__":
  raise SystemExit(main())
