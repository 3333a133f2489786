"""Entity-pair, relation and triple scores exactly as the reference computes them (mgfte.md §5).

Host-side numpy. Spans are half-open word-piece ranges; their strings are the pieces of the
full (untruncated) sentence joined by spaces, so matching is by string, not by position.
"""
import numpy as np

from jaxmm.data.fewrel import B_HEAD, B_TAIL, I_HEAD, I_TAIL

EPS = 1e-10


def spans(tags_L, b_tag: int, i_tag: int) -> list:
  """[(start, end)] for every B tag followed by a maximal run of I tags; stray I are ignored.

  Duplicates cannot arise from one sequence, but order matters downstream: the list is in
  order of start (the reference iterates over a set; see `pair_spans`).
  """
  tags_L = np.asarray(tags_L)
  out = []
  for start in np.flatnonzero(tags_L == b_tag):
    end = start + 1
    while end < len(tags_L) and tags_L[end] == i_tag:
      end += 1
    out.append((int(start), int(end)))
  return out


def span_text(pieces, span) -> str:
  return " ".join(pieces[span[0]:span[1]])


def pair_spans(heads, tails) -> list:
  """Pairs each head span with the tail whose start is nearest the head's start.

  Ties go to the first tail in start order (the reference's set order is arbitrary). A head
  with no tail available yields no pair.
  """
  if not tails:
    return []
  return [(h, min(tails, key=lambda t: abs(t[0] - h[0]))) for h in heads]


def gold_strings(gold_tags_L, pieces, names) -> tuple:
  """Gold head/tail strings: from the first gold spans, else the raw JSON names."""
  gh, gt = spans(gold_tags_L, B_HEAD, I_HEAD), spans(gold_tags_L, B_TAIL, I_TAIL)
  if gh and gt:
    return span_text(pieces, gh[0]), span_text(pieces, gt[0])
  return names


def query_counts(pred_tags_L, pred_rel, gold_tags_L, gold_rel, pieces, names) -> tuple:
  """(predicted, correct pairs, correct triples) contributed by one query."""
  gold_h, gold_t = gold_strings(gold_tags_L, pieces, names)
  heads = spans(pred_tags_L, B_HEAD, I_HEAD)
  tails = spans(pred_tags_L, B_TAIL, I_TAIL)
  predicted = correct = triple = 0
  for h, t in pair_spans(heads, tails):
    h_txt, t_txt = span_text(pieces, h), span_text(pieces, t)
    if not (h_txt and t_txt):
      continue
    predicted += 1
    if h_txt == gold_h and t_txt == gold_t:
      correct += 1
      triple += int(pred_rel == gold_rel)
  return predicted, correct, triple


def _prf(correct, predicted, gold) -> dict:
  p = correct / (predicted + EPS)
  r = correct / gold
  return {"p": p, "r": r, "f1": 2 * p * r / (p + r + EPS)}


def episode_scores(pred_tags, pred_rel, gold_tags, gold_rel, pieces, names) -> dict:
  """Scores of one episode. pred/gold tags i[NQ, L], relations i[NQ]; pieces/names per query.

  Returns {"entity": {p, r, f1}, "triple": {p, r, f1}, "relation": accuracy}.
  """
  counts = np.array([query_counts(pt, pr, gt, gr, pc, nm) for pt, pr, gt, gr, pc, nm in
                     zip(pred_tags, pred_rel, gold_tags, gold_rel, pieces, names)])
  predicted, correct, triple = counts.sum(0)
  gold_num = len(gold_rel)
  return {"entity": _prf(correct, predicted, gold_num), "triple": _prf(triple, predicted, gold_num),
          "relation": float(np.mean(np.asarray(pred_rel) == np.asarray(gold_rel)))}


def mean_scores(per_episode: list) -> dict:
  """Arithmetic mean over episodes of every per-episode number (F1 averaged, not recomputed)."""
  first = per_episode[0]
  out = {}
  for key, val in first.items():
    if isinstance(val, dict):
      out[key] = {k: float(np.mean([e[key][k] for e in per_episode])) for k in val}
    else:
      out[key] = float(np.mean([e[key] for e in per_episode]))
  return out
