"""Metrics on hand-written predictions, with hand-computed P/R/F1 (mgfte.md §5)."""
import numpy as np
import pytest

from jaxmm.mgfte import metrics

P5 = ["[CLS]", "a", "b", "c", "d", "e", "[SEP]"]


def _q(pieces, gold, pred, gold_rel=0, pred_rel=0, names=("?", "?")):
  return dict(pieces=pieces, gold=np.array(gold), pred=np.array(pred), gold_rel=gold_rel,
              pred_rel=pred_rel, names=names)


def _episode(queries):
  return metrics.episode_scores([q["pred"] for q in queries], [q["pred_rel"] for q in queries],
                                [q["gold"] for q in queries], [q["gold_rel"] for q in queries],
                                [q["pieces"] for q in queries], [q["names"] for q in queries])


def test_spans_ignore_stray_inside_tags():
  tags = [0, 2, 2, 1, 2, 0, 4, 3, 1]
  assert metrics.spans(tags, 1, 2) == [(3, 5), (8, 9)]
  assert metrics.spans(tags, 3, 4) == [(7, 8)]


def test_nearest_tail_pairing_and_ties():
  # Nearest by start; equal distances go to the earlier tail.
  assert metrics.pair_spans([(4, 5)], [(1, 2), (6, 7), (8, 9)]) == [((4, 5), (6, 7))]
  assert metrics.pair_spans([(4, 5)], [(2, 3), (6, 7)]) == [((4, 5), (2, 3))]
  assert metrics.pair_spans([(4, 5)], []) == []


def test_hand_computed_episode():
  sent = ["[CLS]", "john", "smith", "was", "born", "in", "paris", "[SEP]"]
  dup = ["[CLS]", "x", "y", "x", "z", "[SEP]"]
  queries = [
      # right pair, right relation: predicted 1, correct 1, triple 1
      _q(sent, [0, 1, 2, 0, 0, 0, 3, 0], [0, 1, 2, 0, 0, 0, 3, 0]),
      # the head pairs with the NEAREST tail "a" (not the gold "e"): predicted 1, correct 0
      _q(P5, [0, 0, 1, 0, 0, 3, 0], [0, 3, 1, 0, 0, 3, 0]),
      # right pair, wrong relation: predicted 1, correct 1, triple 0
      _q(P5, [0, 1, 0, 0, 3, 0, 0], [0, 1, 0, 0, 3, 0, 0], gold_rel=1, pred_rel=2),
      # a head without any tail adds nothing
      _q(P5, [0, 1, 0, 0, 3, 0, 0], [0, 1, 0, 0, 0, 0, 0]),
      # two predicted heads with the gold text both count (reference quirk): 2, 2, 2
      _q(dup, [0, 1, 0, 0, 3, 0], [0, 1, 0, 1, 3, 0]),
      # nothing predicted, wrong relation
      _q(P5, [0, 1, 0, 0, 3, 0, 0], [0] * 7, gold_rel=0, pred_rel=1),
  ]
  got = _episode(queries)
  # predicted = 5, correct = 4, correct triples = 3, gold_num = 6 queries
  p, r = 4 / 5, 4 / 6
  assert got["entity"]["p"] == pytest.approx(p)
  assert got["entity"]["r"] == pytest.approx(r)
  assert got["entity"]["f1"] == pytest.approx(2 * p * r / (p + r))
  tp, tr = 3 / 5, 3 / 6
  assert got["triple"]["f1"] == pytest.approx(2 * tp * tr / (tp + tr))
  assert got["triple"]["p"] == pytest.approx(tp)
  assert got["relation"] == pytest.approx(4 / 6)


def test_gold_falls_back_to_json_names_when_a_span_was_truncated():
  q = _q(["[CLS]", "p", "q", "[SEP]"], [0, 1, 0, 0], [0, 1, 3, 0], names=("p", "q"))
  assert _episode([q])["entity"]["f1"] == pytest.approx(1.0)
  wrong = dict(q, names=("p", "r"))
  assert _episode([wrong])["entity"]["p"] == 0.0


def test_strings_match_word_pieces_not_positions():
  # Gold span "b" at position 2; the prediction finds another "b" at position 4 and still counts.
  pieces = ["[CLS]", "a", "b", "c", "b", "d", "[SEP]"]
  q = _q(pieces, [0, 0, 1, 0, 0, 3, 0], [0, 0, 0, 0, 1, 3, 0])
  assert _episode([q])["entity"]["f1"] == pytest.approx(1.0)
  assert metrics.span_text(["[CLS]", "moe", "##nch", "[SEP]"], (1, 3)) == "moe ##nch"


def test_mean_over_episodes_averages_f1():
  e1 = {"entity": {"p": 0.8, "r": 0.5, "f1": 2 * 0.4 / 1.3}, "triple": {"p": 0, "r": 0, "f1": 0},
        "relation": 0.5}
  e2 = {"entity": {"p": 1.0, "r": 1.0, "f1": 1.0}, "triple": {"p": 1, "r": 1, "f1": 1},
        "relation": 1.0}
  m = metrics.mean_scores([e1, e2])
  assert m["entity"]["f1"] == pytest.approx((2 * 0.4 / 1.3 + 1.0) / 2)   # not F1 of mean P, R
  assert m["relation"] == pytest.approx(0.75)
  assert m["triple"]["r"] == pytest.approx(0.5)
