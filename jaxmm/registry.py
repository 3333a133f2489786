"""Model families, looked up by the `family` stored in a converted folder.

Each family module exposes `Config` (a frozen dataclass with `to_dict`/`from_dict`) and
`forward(cfg, params, **inputs)`. Modules are imported lazily so `import jaxmm` stays light.
"""
import importlib

from jaxmm.errors import ConfigError

FAMILIES = {
    "llava": "jaxmm.models.llava",
    "llava_next": "jaxmm.models.llava_next",
    "llama": "jaxmm.models.llama",
    "qwen2_vl": "jaxmm.models.qwen2_vl",  # Qwen2-VL and Qwen2.5-VL (Config.model_type)
    "bert": "jaxmm.models.bert",
    "mgfte": "jaxmm.mgfte.training",  # Config: ExtractorConfig (encoder + head)
    "cadit": "jaxmm.cadit.loop",  # Config: RunSpec (networks config, task, seed)
}


def family_module(family: str):
  if family not in FAMILIES:
    raise ConfigError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[family])


def takes_images(family: str) -> bool:
  """Whether a decoder family takes images (its inputs include pixel_values)."""
  return "pixel_values" in getattr(family_module(family), "INPUTS", ())


# The family of an in-memory config, for callers that hold a config without a folder.
_CONFIG_FAMILY = {"LlavaConfig": "llava", "LlamaConfig": "llama",
                  "LlavaNextConfig": "llava_next", "Qwen2VLConfig": "qwen2_vl"}


def family_of(cfg) -> str:
  """The registry name of the decoder family (llava, llama) a config belongs to."""
  name = _CONFIG_FAMILY.get(type(cfg).__name__)
  if name is None:
    raise ConfigError(f"no model family for a {type(cfg).__name__}")
  return name
