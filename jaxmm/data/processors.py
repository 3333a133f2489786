"""Loading a model folder's own tokenizer and processor, with a one-line error when the files
are missing (a folder converted from a source without them, or copied without them)."""
from pathlib import Path

from jaxmm.errors import InputError

# Any one of these makes a tokenizer; a processor also needs an image-processor config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _require(folder: Path, needed: tuple, what: str) -> None:
  if not any((folder / f).is_file() for f in needed):
    raise InputError(f"{folder} has no {what} files (none of {', '.join(needed)}): `jaxmm "
                     "convert` copies them from the source folder; convert from a folder that "
                     "has them, or copy them into this one")


def load_tokenizer(folder):
  """The folder's transformers tokenizer (AutoTokenizer), read locally."""
  from transformers import AutoTokenizer
  folder = Path(folder)
  _require(folder, TOKENIZER_FILES, "tokenizer")
  try:
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise InputError(f"{folder}: cannot load its tokenizer: {str(e).splitlines()[0]}") from None


def load_processor(folder):
  """The folder's transformers processor (AutoProcessor: tokenizer + image processor)."""
  from transformers import AutoProcessor
  folder = Path(folder)
  _require(folder, TOKENIZER_FILES, "tokenizer")
  _require(folder, PROCESSOR_FILES, "image processor")
  try:
    return AutoProcessor.from_pretrained(str(folder), local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise InputError(f"{folder}: cannot load its processor: {str(e).splitlines()[0]}") from None
