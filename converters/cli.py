"""Convert a Hugging Face checkpoint folder (or a .gguf file) into a jaxmm model folder.

Usage: jaxmm convert SRC OUT [--dtype float32|bfloat16] [--overwrite]

The family comes from `config.json`'s `model_type`. A family converter is a function
`plan(hf_config: dict, names: list[str]) -> jaxmm.converters.common.Plan` (listed in `PLANNERS`);
this module does the rest: stream the tensors through the plan's rules, then write OUT
atomically with the params, `jaxmm.json`, the source config as `hf_config.json`, and the
tokenizer / processor files, so OUT is self-contained.
"""
import argparse
import importlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

import jaxmm.cli
from jaxmm.converters import common
from jaxmm import checkpoint, sharding
from jaxmm.errors import ConfigError, ConversionError

# model_type -> "module:function" returning a common.Plan. Imported lazily.
PLANNERS = {
    "llava": "jaxmm.converters.llava:plan_llava",
    "llava_next": "jaxmm.converters.llava_next:plan",
    "llama": "jaxmm.converters.llava:plan_llama",
    "bert": "jaxmm.converters.bert:plan",
    "qwen2_vl": "jaxmm.converters.qwen2_vl:plan",
    "qwen2_5_vl": "jaxmm.converters.qwen2_vl:plan",
}

# Files copied verbatim from SRC when present: what tokenizers, processors and generation need.
AUX_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.txt", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "processor_config.json", "preprocessor_config.json",
    "generation_config.json",
)
HF_CONFIG = "hf_config.json"  # the source config.json, kept so an export can rebuild SRC

DTYPES = {"float32": np.float32, "bfloat16": "bfloat16"}


def add_args(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("src", help="Hugging Face model folder (config.json + weights) or a .gguf file")
  parser.add_argument("out", help="output jaxmm model folder")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                      help="params dtype (default float32; bfloat16 halves memory)")
  parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  sharding.add_args(parser)


def run(args) -> int:
  src = Path(args.src)
  mesh = sharding.mesh_from_args(args)
  if src.suffix == ".gguf":
    from jaxmm.converters.gguf import gguf_to_hf  # pulls in torch/transformers: only for GGUF
    with tempfile.TemporaryDirectory(prefix="jaxmm-gguf-") as tmp:
      gguf_to_hf(src, Path(tmp) / "hf")
      out = convert_folder(Path(tmp) / "hf", args.out, args.dtype, args.overwrite, mesh,
                           args.sharding)
  else:
    out = convert_folder(src, args.out, args.dtype, args.overwrite, mesh, args.sharding)
  print(f"wrote {out}")
  return 0


def read_hf_config(src: Path) -> dict:
  path = src / "config.json"
  if not src.is_dir():
    raise ConversionError(f"source folder {src} does not exist")
  if not path.is_file():
    raise ConversionError(f"{src} has no config.json")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from None


def planner(hf_config: dict, src: Path):
  """The family converter for `hf_config['model_type']`."""
  model_type = hf_config.get("model_type")
  if model_type not in PLANNERS:
    raise ConfigError(f"{src / 'config.json'}: unknown model_type {model_type!r}; "
                      f"known: {', '.join(sorted(PLANNERS))}")
  module, fn = PLANNERS[model_type].split(":")
  return getattr(importlib.import_module(module), fn)


def convert_model(model, dtype: str = "float32"):
  """(jaxmm config, params) of an in-memory transformers model, through its family's name table.

  The same planner and rules as `convert_folder`, reading the tensors from `model.state_dict()`.
  """
  sd = model.state_dict()
  hf_config = model.config.to_dict()
  plan = planner(hf_config, Path(f"<{type(model).__name__}>"))(hf_config, list(sd))
  params = common.convert(common.TensorSource.from_state_dict(sd), plan.rules,
                          dtype=DTYPES[dtype], ignore=plan.ignore)
  return plan.config, params


def convert_folder(src, out, dtype: str = "float32", overwrite: bool = False, mesh=None,
                   sharding_preset: str = "fsdp") -> Path:
  """Converts the Hugging Face folder `src` into the jaxmm folder `out`; returns `out`. With a
  `mesh`, each tensor goes onto the mesh as it is read (`sharding_preset`'s rules) and the
  folder is written from the shards, so no host holds the whole model."""
  src = Path(src)
  hf_config = read_hf_config(src)
  plan_fn = planner(hf_config, src)
  source = common.TensorSource.open(src)
  plan = plan_fn(hf_config, source.names())
  common.check(source, plan.rules, plan.ignore)  # fail before touching OUT
  shardings = None
  if mesh is not None:
    shardings = common.flatten(sharding.param_shardings(plan.rules, mesh, sharding_preset))
  with checkpoint.atomic_dir(out, overwrite) as tmp:
    params = common.convert(source, plan.rules, dtype=DTYPES[dtype], ignore=plan.ignore,
                            progress=True, shardings=shardings)
    checkpoint.write_params(tmp, params)
    del params
    _copy_aux(src, tmp)
    meta = {"format": checkpoint.FORMAT, "family": plan.family, "config": plan.config.to_dict()}
    (tmp / checkpoint.META).write_text(json.dumps(meta, indent=2))
  return Path(out)


def _copy_aux(src: Path, dst: Path) -> None:
  shutil.copy2(src / "config.json", dst / HF_CONFIG)
  for name in AUX_FILES:
    if (src / name).is_file():
      shutil.copy2(src / name, dst / name)


if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
