"""FewRel tokenisation, 5-tag labels and episode sampling (mgfte.md §2.3-2.4)."""
import numpy as np
import pytest

from jaxmm.data import fewrel
from jaxmm.mgfte import metrics
from jaxmm.mgfte.episodes import EpisodeSampler

INST = {"tokens": ["Moench", "was", "born", "in", "Kassel", "Germany", "."],
        "h": ["moench", "Q1", [[0]]], "t": ["kassel germany", "Q2", [[4, 5]]]}


def test_tags_follow_word_piece_alignment(tokenizer):
  ids, mask, tags, pieces, names = fewrel.encode(tokenizer, [INST], max_len=12)
  assert pieces[0][:3] == ["[CLS]", "moe", "##nch"]
  n = len(pieces[0])
  assert mask[0].tolist() == [1] * n + [0] * (12 - n)
  head, tail = (1, 3), (pieces[0].index("kassel"), pieces[0].index("germany") + 1)
  want = np.zeros(12, np.int32)
  want[head[0]], want[head[0] + 1:head[1]] = 1, 2
  want[tail[0]], want[tail[0] + 1:tail[1]] = 3, 4
  np.testing.assert_array_equal(tags[0], want)
  assert ids[0, 0] == tokenizer.cls_token_id and ids[0, n - 1] == tokenizer.sep_token_id
  assert names[0] == ("moench", "kassel germany")


def test_truncation_drops_positions_beyond_max_len(tokenizer):
  _, mask, tags, pieces, _ = fewrel.encode(tokenizer, [INST], max_len=5)
  assert mask[0].tolist() == [1] * 5 and tags[0].tolist() == [0, 1, 2, 0, 0]
  assert len(pieces[0]) > 5            # the full piece list is kept for span strings


def test_real_fewrel_spans_spell_the_mentions(tokenizer, shared_data):
  shared_data("fewrel", "mgfte", "val.json")
  data = fewrel.load_split(fewrel.SPLITS["val"], tokenizer, max_per_relation=8)
  insts = [i for r in fewrel.load_relations(fewrel.SPLITS["val"]).values() for i in r[:8]]
  checked = 0
  for row, inst in enumerate(insts):
    for key, b, i in (("h", 1, 2), ("t", 3, 4)):
      words = [inst["tokens"][w].lower() for w in inst[key][2][0]]
      found = metrics.spans(data.tags[row], b, i)
      if found and found[0][1] < fewrel.MAX_LEN:
        want = " ".join(tokenizer.tokenize(" ".join(words)))
        assert metrics.span_text(data.pieces[row], found[0]) == want
        checked += 1
  assert checked > 0.9 * 2 * len(insts)
  assert data.ranges.tolist() == [[8 * r, 8 * r + 8] for r in range(15)]


def _toy_split(n_rel=6, per_rel=9, l=4):
  n = n_rel * per_rel
  rows = np.arange(n, dtype=np.int32)
  arr = np.repeat(rows[:, None], l, axis=1)       # every array row holds its own row index
  ranges = np.stack([np.arange(n_rel) * per_rel, np.arange(1, n_rel + 1) * per_rel], 1)
  return fewrel.Encoded(arr, arr, arr, rows // per_rel, ranges, [f"P{i}" for i in range(n_rel)],
                        [], [])


def test_episode_shapes_labels_and_distinct_draws():
  data = _toy_split()
  s = EpisodeSampler(data, n_way=3, k_shot=2, n_query=2, batch=2, seed=0)
  ep = s.sample()
  assert ep["s_ids"].shape == (2, 3, 2, 4) and ep["q_ids"].shape == (2, 6, 4)
  for b in range(2):
    classes = ep["classes"][b]
    assert len(set(classes)) == 3
    s_rows, q_rows = ep["s_ids"][b, ..., 0], ep["q_ids"][b, :, 0]
    assert len(set(s_rows.ravel()) | set(q_rows)) == 3 * 4           # no instance drawn twice
    np.testing.assert_array_equal(data.rel[s_rows], np.repeat(classes[:, None], 2, 1))
    np.testing.assert_array_equal(data.rel[q_rows], classes[ep["q_rel"][b]])
    np.testing.assert_array_equal(ep["q_rel"][b], [0, 0, 1, 1, 2, 2])


def test_sampler_is_seeded_and_resumes_from_its_state():
  data = _toy_split()
  a = EpisodeSampler(data, 3, 2, 2, batch=1, seed=7)
  first = [a.sample()["q_rows"] for _ in range(3)]
  state = a.state()
  rest = [a.sample()["q_rows"] for _ in range(3)]
  b = EpisodeSampler(data, 3, 2, 2, batch=1, seed=7)
  np.testing.assert_array_equal(b.sample()["q_rows"], first[0])
  c = EpisodeSampler(data, 3, 2, 2, batch=1, seed=123)
  c.set_state(state)
  for want in rest:
    np.testing.assert_array_equal(c.sample()["q_rows"], want)


def test_sampler_rejects_impossible_settings():
  with pytest.raises(fewrel.JaxmmError):
    EpisodeSampler(_toy_split(), n_way=7, k_shot=1, n_query=1)
  with pytest.raises(fewrel.JaxmmError):
    EpisodeSampler(_toy_split(), n_way=2, k_shot=5, n_query=5)
