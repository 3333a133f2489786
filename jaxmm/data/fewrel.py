"""FewRel relation files -> padded word-piece arrays with the 5-tag head/tail labels (mgfte.md §2).

A split is named by a spec string `FILE[:REL,REL,...]`: FILE is relative to the data root (or
absolute), the optional list keeps only those relations. The default protocol (fixed here, see
the issue's Protocol section) trains on the 12 `val_wiki` relations in neither MG-FTE split,
validates on `mgfte/val.json` and tests on `mgfte/test.json`. With the full FewRel, pass e.g.
`--train /path/to/train.json` to train on all 50 relations.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxmm.data import data_path
from jaxmm.errors import JaxmmError

O, B_HEAD, I_HEAD, B_TAIL, I_TAIL = range(5)
NUM_TAGS = 5
MAX_LEN = 90

TRAIN_FALLBACK = ("P177", "P364", "P641", "P59", "P413", "P206", "P155", "P26", "P410", "P25",
                  "P463", "P40")
SPLITS = {
    "train": "fewrel/val_wiki.json:" + ",".join(TRAIN_FALLBACK),
    "val": "fewrel/mgfte/val.json",
    "test": "fewrel/mgfte/test.json",
    # Cross-domain (§4.3): train on the Wikipedia split above, validate/test on PubMed.
    "val_pubmed": "fewrel/mgfte/new_val_pubmed.json",
    "test_pubmed": "fewrel/mgfte/new_test_pubmed.json",
    "unlabeled_pubmed": "fewrel/pubmed_unsupervised.json",
}


@dataclasses.dataclass
class Encoded:
  """A tokenised split. Instances of relation r occupy rows ranges[r, 0]:ranges[r, 1].

  ids/mask/tags i32[n, L]; rel i32[n] (index into `relations`, -1 when unlabelled);
  pieces: the full untruncated [CLS] + pieces + [SEP] per row (for span strings);
  names: the lower-cased head/tail surface strings from the JSON (metric fallback).
  """
  ids: np.ndarray
  mask: np.ndarray
  tags: np.ndarray
  rel: np.ndarray
  ranges: np.ndarray
  relations: list
  pieces: list
  names: list


def resolve(spec: str):
  """`FILE[:REL,...]` -> (path, relations or None). A missing `.json` suffix is appended."""
  file, _, rels = spec.partition(":")
  if not file.endswith(".json"):
    file += ".json"   # the reference names the unlabelled file without its extension
  path = Path(file) if Path(file).is_absolute() else data_path(*Path(file).parts)
  if not path.is_file():
    raise JaxmmError(f"FewRel file not found: {path}")
  return path, (tuple(r for r in rels.split(",") if r) or None)


def load_relations(spec: str) -> dict:
  """{relation id: [instance, ...]} in file order, restricted to the spec's relations."""
  path, keep = resolve(spec)
  data = json.loads(path.read_text())
  if not isinstance(data, dict):
    raise JaxmmError(f"{path} is not a FewRel relation file (a dict of relation -> instances)")
  if keep is None:
    return data
  missing = sorted(set(keep) - set(data))
  if missing:
    raise JaxmmError(f"{path} has no relation(s) {missing}")
  return {r: data[r] for r in keep}


def load_tokenizer(folder):
  """The BERT word-piece tokenizer stored beside the model (local files only)."""
  import transformers  # deferred: heavy import, only needed when tokenising
  try:
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
  except (OSError, ValueError) as e:
    raise JaxmmError(f"no tokenizer files in {folder}: {e}") from None


def _word_starts(word_ids, n_words: int) -> np.ndarray:
  """i64[n_words + 1]: piece position of each word's first piece (+1 for [CLS]); last = end."""
  counts = np.bincount([w for w in word_ids if w is not None], minlength=n_words)
  return 1 + np.concatenate([[0], np.cumsum(counts)])


def _write_span(tags_L, start, end, b_tag, i_tag):
  """Marks [start, end) with B then I; positions beyond the padded length are dropped."""
  l = tags_L.shape[0]
  if start < l and end > start:
    tags_L[start] = b_tag
    tags_L[start + 1:min(end, l)] = i_tag


def _tags(inst, starts, max_len) -> np.ndarray:
  """5-tag labels for one instance; the tail is written after the head (tail wins overlaps)."""
  tags = np.zeros(max_len, np.int32)
  for key, b, i in (("h", B_HEAD, I_HEAD), ("t", B_TAIL, I_TAIL)):
    mention = inst[key][2][0]
    _write_span(tags, starts[mention[0]], starts[mention[-1] + 1], b, i)
  return tags


def encode(tokenizer, instances, max_len: int = MAX_LEN, labelled: bool = True):
  """Instances -> (ids, mask, tags, pieces, names); [CLS] pieces [SEP], truncated and padded."""
  words = [[w.lower() for w in inst["tokens"]] for inst in instances]
  enc = tokenizer(words, is_split_into_words=True, add_special_tokens=False)
  n = len(instances)
  ids = np.full((n, max_len), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((n, max_len), np.int32)
  tags = np.zeros((n, max_len), np.int32)
  pieces, names = [], []
  for row, inst in enumerate(instances):
    seq = [tokenizer.cls_token_id] + enc["input_ids"][row] + [tokenizer.sep_token_id]
    k = min(len(seq), max_len)
    ids[row, :k], mask[row, :k] = seq[:k], 1
    pieces.append(tokenizer.convert_ids_to_tokens(seq))
    if labelled:
      tags[row] = _tags(inst, _word_starts(enc.word_ids(row), len(words[row])), max_len)
      names.append((inst["h"][0].lower(), inst["t"][0].lower()))
  return ids, mask, tags, pieces, names


def load_split(spec: str, tokenizer, max_len: int = MAX_LEN, max_per_relation=None) -> Encoded:
  """Tokenises a relation file. `max_per_relation` keeps the first k instances (tests, smoke runs)."""
  data = load_relations(spec)
  relations = list(data)
  chunks = [data[r][:max_per_relation] for r in relations]
  sizes = np.array([len(c) for c in chunks])
  ranges = np.stack([np.cumsum(sizes) - sizes, np.cumsum(sizes)], axis=1)
  ids, mask, tags, pieces, names = encode(tokenizer, [i for c in chunks for i in c], max_len)
  rel = np.repeat(np.arange(len(relations), dtype=np.int32), sizes)
  return Encoded(ids, mask, tags, rel, ranges, relations, pieces, names)


def load_unlabeled(spec: str, tokenizer, max_len: int = MAX_LEN) -> Encoded:
  """The unlabelled PubMed list (only `tokens` is read)."""
  path, _ = resolve(spec)
  data = json.loads(path.read_text())
  if not isinstance(data, list):
    raise JaxmmError(f"{path} is not an unlabelled instance list")
  ids, mask, tags, pieces, _ = encode(tokenizer, data, max_len, labelled=False)
  rel = np.full(len(data), -1, np.int32)
  return Encoded(ids, mask, tags, rel, np.array([[0, len(data)]]), [], pieces, [])
