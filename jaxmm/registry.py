"""Model families, looked up by the `family` stored in a converted folder.

Each family module exposes `Config` (a frozen dataclass with `to_dict`/`from_dict`) and
`forward(cfg, params, **inputs)`. Modules are imported lazily so `import jaxmm` stays light.
"""
import importlib

from jaxmm.errors import ConfigError

FAMILIES = {
    "llava": "jaxmm.models.llava",
    "llama": "jaxmm.models.llama",
    "bert": "jaxmm.models.bert",
}


def family_module(family: str):
  if family not in FAMILIES:
    raise ConfigError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
  return importlib.import_module(FAMILIES[family])
