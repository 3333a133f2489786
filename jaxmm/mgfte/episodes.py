"""Seeded N-way K-shot episode sampling with static shapes (mgfte.md §2.4).

One episode: N distinct relations drawn uniformly, then K + Q distinct instances per relation
(the first K are support, the rest queries, grouped by class). A batch stacks B independent
episodes. The numpy Generator's state is exposed so a resumed training run draws the same data.
"""
import numpy as np

from jaxmm.data.fewrel import Encoded
from jaxmm.errors import JaxmmError


def _rng_from_state(state: dict) -> np.random.Generator:
  rng = np.random.Generator(getattr(np.random, state["bit_generator"])())
  rng.bit_generator.state = state
  return rng


class EpisodeSampler:
  """Draws batches of episodes from an encoded split.

  `sample()` returns numpy arrays:
    s_ids, s_mask, s_tags  i32[B, N, K, L]    support sentences
    q_ids, q_mask, q_tags  i32[B, N*Q, L]     queries, grouped by class
    q_rel                  i32[B, N*Q]        gold position 0..N-1 of each query's relation
    s_rows                 i32[B, N, K]       row of each support sentence in `data`
    q_rows                 i32[B, N*Q]        row of each query in `data` (pieces, names)
    classes                i32[B, N]          relation index of each episode position
  """

  def __init__(self, data: Encoded, n_way: int, k_shot: int, n_query: int, batch: int = 1,
               seed: int = 3000):
    sizes = data.ranges[:, 1] - data.ranges[:, 0]
    if n_way > len(sizes):
      raise JaxmmError(f"{n_way}-way episodes need {n_way} relations; the split has {len(sizes)}")
    if k_shot + n_query > sizes.min():
      raise JaxmmError(f"K + Q = {k_shot + n_query} exceeds the smallest relation ({sizes.min()})")
    self.data, self.n, self.k, self.q, self.b = data, n_way, k_shot, n_query, batch
    self.rng = np.random.default_rng(seed)

  def state(self) -> dict:
    """JSON-serialisable generator state."""
    return self.rng.bit_generator.state

  def set_state(self, state: dict) -> None:
    self.rng = _rng_from_state(state)

  def _episode_rows(self):
    """(classes i[N], rows i[N, K+Q]) for one episode."""
    classes = self.rng.choice(len(self.data.ranges), self.n, replace=False)
    rows = [lo + self.rng.choice(hi - lo, self.k + self.q, replace=False)
            for lo, hi in self.data.ranges[classes]]
    return classes, np.stack(rows)

  def sample(self) -> dict:
    classes, rows = zip(*(self._episode_rows() for _ in range(self.b)))
    classes, rows = np.stack(classes), np.stack(rows)               # [B, N], [B, N, K+Q]
    s_rows = rows[:, :, :self.k]
    q_rows = rows[:, :, self.k:].reshape(self.b, self.n * self.q)
    d = self.data
    out = {f"s_{name}": getattr(d, name)[s_rows] for name in ("ids", "mask", "tags")}
    out.update({f"q_{name}": getattr(d, name)[q_rows] for name in ("ids", "mask", "tags")})
    out["q_rel"] = np.broadcast_to(np.repeat(np.arange(self.n), self.q),
                                   (self.b, self.n * self.q)).astype(np.int32)
    out["s_rows"] = s_rows.astype(np.int32)
    out["q_rows"] = q_rows.astype(np.int32)
    out["classes"] = classes.astype(np.int32)
    return out


class UnlabeledSampler:
  """Target-domain sentences for the adversarial step: per episode slot, n distinct rows."""

  def __init__(self, data: Encoded, per_episode: int, batch: int, seed: int):
    if per_episode > len(data.ids):
      raise JaxmmError(f"need {per_episode} unlabelled sentences, have {len(data.ids)}")
    self.data, self.per_episode, self.b = data, per_episode, batch
    self.rng = np.random.default_rng(seed)

  def state(self) -> dict:
    return self.rng.bit_generator.state

  def set_state(self, state: dict) -> None:
    self.rng = _rng_from_state(state)

  def sample(self) -> dict:
    """ids, mask i32[B * per_episode, L]."""
    rows = np.concatenate([self.rng.choice(len(self.data.ids), self.per_episode, replace=False)
                           for _ in range(self.b)])
    return {"ids": self.data.ids[rows], "mask": self.data.mask[rows]}
