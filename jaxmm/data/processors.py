"""Loading a model folder's own tokenizer and processor, with a one-line error when the files
are missing (a folder converted from a source without them, or copied without them)."""
import inspect
import json
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


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer(folder):
  """The folder's transformers tokenizer (AutoTokenizer), read locally."""
  from transformers import AutoTokenizer
  folder = Path(folder)
  _require(folder, TOKENIZER_FILES, "tokenizer")
  try:
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  except (OSError, ValueError, KeyError) as e:
    raise InputError(f"{folder}: cannot load its tokenizer: {_first_line(e)}") from None


def load_processor(folder):
  """The folder's transformers processor (AutoProcessor: tokenizer + image processor).

  A processor whose video processor cannot load because its backend is missing (Qwen2-VL's
  needs torchvision, which jaxmm does not require) is loaded without it: images and text work;
  it processes no videos.
  """
  from transformers import AutoProcessor
  folder = Path(folder)
  _require(folder, TOKENIZER_FILES, "tokenizer")
  _require(folder, PROCESSOR_FILES, "image processor")
  try:
    proc = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
  except ImportError as e:
    proc = _without_video(folder, e)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{folder}: cannot load its processor: {_first_line(e)}") from None
  if not hasattr(proc, "image_processor"):
    raise InputError(f"{folder}: its files make a {type(proc).__name__}, not a processor with "
                     "an image processor (no `processor_class` in "
                     f"{' or '.join(PROCESSOR_FILES)})")
  return proc


def _processor_class(folder: Path):
  """The processor class named by the folder's processor files (`processor_class`), or None."""
  import transformers
  for name in PROCESSOR_FILES:
    path = folder / name
    if path.is_file():
      try:
        cls_name = json.loads(path.read_text()).get("processor_class")
      except (json.JSONDecodeError, AttributeError):
        continue
      if cls_name:
        return getattr(transformers, cls_name, None)
  return None


def _without_video(folder: Path, err: ImportError):
  """The folder's processor, built without its video processor (whose import failed: `err`).
  Only for processor classes taking (image_processor, tokenizer, video_processor, ...)."""
  cls = _processor_class(folder)
  params = list(inspect.signature(cls.__init__).parameters)[1:4] if cls else []
  if params != ["image_processor", "tokenizer", "video_processor"]:
    raise InputError(f"{folder}: cannot load its processor: {_first_line(err)}") from None

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    cls.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

  # transformers derives a processor's parts from its __init__ signature: this one has no video.
  image_only = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})
  try:
    return image_only.from_pretrained(str(folder), local_files_only=True)
  except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
    raise InputError(f"{folder}: cannot load its processor: {_first_line(e)}") from None
