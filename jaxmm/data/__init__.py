"""Data loaders. Real data lives outside the repo and is found through `JAXMM_DATA`."""
import os
from pathlib import Path

from jaxmm.errors import JaxmmError

_REPO = Path(__file__).resolve().parents[2]


def data_root() -> Path:
  """`$JAXMM_DATA`, else `../shared/data` next to the repository root."""
  return Path(os.environ.get("JAXMM_DATA", _REPO.parent / "shared" / "data"))


def data_path(*parts: str) -> Path:
  """A file or folder under the data root; a clear error when it is missing."""
  p = data_root().joinpath(*parts)
  if not p.exists():
    raise JaxmmError(f"data not found: {p} (set JAXMM_DATA to the folder holding "
                     f"{'/'.join(parts[:1])}/)")
  return p
