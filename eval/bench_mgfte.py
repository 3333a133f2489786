"""Training-step time of jaxmm's MG-FTE against a PyTorch rebuild of the reference's step.

  python -m jaxmm.eval.bench_mgfte --hf HF_BERT_FOLDER [--runs 7] [--batch 2 --n 5 --k 5 --q 5]
                                   [--length-buckets 48,64,90] [--out results/bench_mgfte.json]

Both sides start from the same encoder weights (the PyTorch BERT folder, converted in-process
for jaxmm) and take the same FewRel training episodes (`EpisodeSampler`, seed 3000). Steps run
interleaved in one process, each side alternately first, after warm-up steps that compile
every length bucket the timed episodes need; the medians and their ratio are reported with the
machine's jitted GEMM rate.

The PyTorch side is this file's own rebuild of ycm094/MG-FTE-main's training step (`MGFRTE.py`,
`framework.py`; read, not copied) with the cost structure that matters for timing:
  - BERT over the full padded length (90); the sequence is cut to the set's longest sentence
    only after the encoder, support and queries in two encoder calls; dropout 0.2 on features;
  - tag prototypes with a Python loop over support sentences and tags (`nonzero` +
    `index_select` + mean);
  - proto-level fusion with the (query, class) pairs materialised by `repeat`, co-attention, the
    4D -> D fusion layer on every (query, class, token) triple, max/mean aggregation, the
    relation MLP;
  - the entity decoder with a Python loop over queries; a linear-chain CRF (forward algorithm
    looping over positions, as pytorch-crf does), and its Viterbi decode, which the reference
    also runs in training;
  - Adam with two groups (encoder 1e-5, head 1e-3) and coupled L2 1e-5, as the reference.
The reference's per-step validation call (framework.py, a bug the spec excludes) is left out.
"""
import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jaxmm.cli
from jaxmm import checkpoint
from jaxmm.data import fewrel
from jaxmm.eval import prune_bench
from jaxmm.mgfte import model as model_lib
from jaxmm.mgfte import training
from jaxmm.mgfte.episodes import EpisodeSampler


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--hf", required=True, help="a transformers BERT folder (e.g. MiniLM)")
  p.add_argument("--train", default=fewrel.SPLITS["train"], help="split spec FILE[:REL,...]")
  p.add_argument("--max-per-relation", type=int, help="use only the first k instances per relation")
  p.add_argument("--runs", type=int, default=7, help="timed steps per side")
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--n", type=int, default=5)
  p.add_argument("--k", type=int, default=5)
  p.add_argument("--q", type=int, default=5)
  p.add_argument("--length-buckets", default="48,64,90", help="jaxmm's buckets (as train mgfte)")
  p.add_argument("--out", default="results/bench_mgfte.json")


# ---- the PyTorch rebuild --------------------------------------------------------------------------

def torch_crf(num_tags: int):
  """A linear-chain CRF as pytorch-crf computes it (batch first): NLL by the forward algorithm,
  Viterbi with Python backtracking."""
  import torch

  class CRF(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.start = torch.nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
      self.end = torch.nn.Parameter(torch.empty(num_tags).uniform_(-0.1, 0.1))
      self.trans = torch.nn.Parameter(torch.empty(num_tags, num_tags).uniform_(-0.1, 0.1))

    def log_likelihood(self, em_BxLxT, tags_BxL, mask_BxL):
      b, l, _ = em_BxLxT.shape
      m = mask_BxL.bool()
      ar = torch.arange(b)
      num = self.start[tags_BxL[:, 0]] + em_BxLxT[ar, 0, tags_BxL[:, 0]]
      alpha = self.start + em_BxLxT[:, 0]
      for t in range(1, l):
        step = self.trans[tags_BxL[:, t - 1], tags_BxL[:, t]] + em_BxLxT[ar, t, tags_BxL[:, t]]
        num = num + step * m[:, t]
        nxt = torch.logsumexp(alpha[:, :, None] + self.trans + em_BxLxT[:, t, None], dim=1)
        alpha = torch.where(m[:, t, None], nxt, alpha)
      last = tags_BxL[ar, m.sum(1) - 1]
      return num + self.end[last] - torch.logsumexp(alpha + self.end, dim=1)

    def decode(self, em_BxLxT, mask_BxL):
      b, l, _ = em_BxLxT.shape
      m = mask_BxL.bool()
      score, history = self.start + em_BxLxT[:, 0], []
      for t in range(1, l):
        best, idx = (score[:, :, None] + self.trans + em_BxLxT[:, t, None]).max(dim=1)
        score = torch.where(m[:, t, None], best, score)
        history.append(idx)
      score = score + self.end
      lengths = m.sum(1).tolist()
      paths = []
      for i in range(b):
        tag = int(score[i].argmax())
        path = [tag]
        for h in reversed(history[:lengths[i] - 1]):
          tag = int(h[i, tag])
          path.append(tag)
        paths.append(path[::-1])
      return paths

  return CRF()


def torch_reference(bert_model, num_tags: int = 5, dropout: float = 0.2):
  """The rebuilt MG-FTE module: forward(batch of torch tensors) -> loss."""
  import torch
  nn = torch.nn
  d = bert_model.config.hidden_size

  class Reference(nn.Module):
    def __init__(self):
      super().__init__()
      self.bert, self.drop = bert_model, nn.Dropout(dropout)
      self.proj = nn.Linear(4 * d, d)
      self.rel = nn.Sequential(nn.Linear(4 * d, d), nn.ReLU(), nn.Linear(d, 1))
      self.crf = torch_crf(num_tags)

    def encode(self, ids, mask):
      h = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state   # full length
      cut = int(mask.sum(1).max())
      h, mask = h[:, :cut], mask[:, :cut]
      return self.drop(h) * mask[..., None], mask

    def prototypes(self, hs, tags, mask):
      rows = []
      for i in range(hs.shape[0]):
        per_tag = []
        for t in range(num_tags):
          idx = torch.nonzero((tags[i] == t) & (mask[i] > 0)).squeeze(-1)
          per_tag.append(hs[i].index_select(0, idx).mean(0) if idx.numel() else hs.new_zeros(d))
        rows.append(torch.stack(per_tag))
      return torch.stack(rows)

    def fuse(self, x, y):
      return torch.relu(self.proj(torch.cat([x, y, (x - y).abs(), x * y], -1)))

    def forward(self, t, b, n, k, nq):
      hs, sm = self.encode(t["s_ids"], t["s_mask"])
      hq, qm = self.encode(t["q_ids"], t["q_mask"])
      p = self.prototypes(hs, t["s_tags"][:, :hs.shape[1]], sm)
      p = p.view(b, n, k, num_tags, d).mean(2)
      lq = hq.shape[1]
      s = p[:, None].repeat(1, nq, 1, 1, 1).view(-1, num_tags, d)
      q = hq.view(b, nq, 1, lq, d).repeat(1, 1, n, 1, 1).view(-1, lq, d)
      qmf = qm.view(b, nq, 1, lq).repeat(1, 1, n, 1).view(-1, lq, 1).float()
      smf = torch.ones(s.shape[0], num_tags, 1)
      att = s @ q.transpose(1, 2) + smf @ qmf.transpose(1, 2) * 100
      s_att = torch.softmax(att, -1) @ q * smf
      q_att = torch.softmax(att.transpose(1, 2), -1) @ s * qmf
      s_hat, q_hat = self.fuse(s, s_att), self.fuse(q, q_att)
      lens = qmf.sum(1)
      u = torch.cat([q_hat.max(1)[0], q_hat.sum(1) / lens], -1)
      v = torch.cat([s_hat.max(1)[0], s_hat.mean(1)], -1)
      logits = self.rel(torch.cat([u, v], -1)).view(b * nq, n)
      gold = t["q_rel"].reshape(-1)
      em = []
      for j in range(b * nq):
        r = j * n + int(gold[j])
        tok = torch.cat([q_hat[r], hq[j]], -1)
        proto = torch.cat([s_hat[r], s[r]], -1)
        em.append(-torch.norm(tok[:, None] - proto[None], dim=-1))
      em = torch.stack(em)
      q_tags = t["q_tags"][:, :lq]
      nll = -self.crf.log_likelihood(em, q_tags, qm).mean()
      self.crf.decode(em.detach(), qm)   # the reference decodes in training too (result unused)
      return nn.functional.cross_entropy(logits, gold) + nll

  return Reference()


def torch_step(model, b: int, n: int, k: int, q: int):
  """step(batch of numpy arrays) -> loss: one update with the reference's optimiser."""
  import torch
  enc = list(model.bert.parameters())
  ids = {id(p) for p in enc}
  opt = torch.optim.Adam([{"params": enc, "lr": 1e-5},
                          {"params": [p for p in model.parameters() if id(p) not in ids],
                           "lr": 1e-3}], weight_decay=1e-5)
  model.train()

  def run(batch):
    l = batch["s_ids"].shape[-1]
    t = {key: torch.as_tensor(np.asarray(batch[key]).reshape(-1, l), dtype=torch.long)
         for key in ("s_ids", "s_mask", "s_tags", "q_ids", "q_mask", "q_tags")}
    t["q_rel"] = torch.as_tensor(np.ascontiguousarray(batch["q_rel"]), dtype=torch.long)
    loss = model(t, b, n, k, n * q)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

  return run


# ---- jaxmm --------------------------------------------------------------------------------------

def jaxmm_step(enc_folder, buckets: tuple, seed: int = 3000):
  """jaxmm's `train mgfte` step (model_inputs with length buckets, the jitted update)."""
  bcfg, enc = training.load_encoder(enc_folder)
  mcfg = model_lib.Config()
  key = jax.random.key(seed, impl="rbg")
  k_head, step_key = jax.random.split(key)
  params = {"encoder": enc, "head": model_lib.init_head(mcfg, bcfg.hidden_size, k_head)}
  tx = training.make_optimizer()
  step_fn = training.make_train_step(bcfg, mcfg, tx)
  state = {"params": params, "opt_state": tx.init(params), "i": 0}

  def run(batch):
    rng = jax.random.fold_in(step_key, state["i"])
    state["params"], state["opt_state"], m = step_fn(state["params"], state["opt_state"],
                                                     training.model_inputs(batch, buckets), rng)
    state["i"] += 1
    return float(jax.block_until_ready(m["loss"]))

  return run


def timed(fn, batch) -> float:
  t0 = time.perf_counter()
  fn(batch)
  return time.perf_counter() - t0


def run(args) -> int:
  import torch
  from transformers import BertModel
  from jaxmm.converters import cli as convert_cli
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count())
  tok = fewrel.load_tokenizer(args.hf)
  data = fewrel.load_split(args.train, tok, max_per_relation=args.max_per_relation)
  sampler = EpisodeSampler(data, args.n, args.k, args.q, args.batch, 3000)
  batches = [sampler.sample() for _ in range(args.runs)]
  buckets = training.parse_buckets(args.length_buckets)
  with tempfile.TemporaryDirectory(prefix="jaxmm-bench-mgfte-") as tmp:
    jx = jaxmm_step(convert_cli.convert_folder(args.hf, Path(tmp) / "enc"), buckets)
  ref = torch_step(torch_reference(BertModel.from_pretrained(args.hf)),
                   args.batch, args.n, args.k, args.q)
  cuts = sorted({training.bucket_cut(buckets, b["s_mask"], b["q_mask"]) for b in batches})
  t0 = time.perf_counter()
  for c in cuts:   # compile every bucket the timed episodes use
    jx(next(b for b in batches if training.bucket_cut(buckets, b["s_mask"], b["q_mask"]) == c))
  compile_s = time.perf_counter() - t0
  ref(batches[0])
  times = {"jaxmm": [], "torch_reference": []}
  for i, batch in enumerate(batches):   # interleaved, each side first on alternate steps
    order = ("jaxmm", "torch_reference") if i % 2 == 0 else ("torch_reference", "jaxmm")
    for name in order:
      times[name].append(timed(jx if name == "jaxmm" else ref, batch))
  med = {k: statistics.median(v) for k, v in times.items()}
  res = {"episode": {"batch": args.batch, "n": args.n, "k": args.k, "q": args.q,
                     "padded_length": int(batches[0]["s_ids"].shape[-1])},
         "buckets": list(buckets), "jaxmm_cuts": cuts, "runs": args.runs,
         **{f"{k}_median_s": v for k, v in med.items()}, "times_s": times,
         "ratio_jaxmm_over_reference": med["jaxmm"] / med["torch_reference"],
         "jaxmm_compile_s": compile_s, "matmul_gflops": prune_bench.matmul_gflops(),
         "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
         "jax_backend": jax.default_backend(), "machine": platform.machine()}
  print(f"MG-FTE training step ({args.batch} x {args.n}-way {args.k}-shot, {args.q} queries per "
        f"class), median of {args.runs} interleaved steps:\n"
        f"  jaxmm            {med['jaxmm']:.2f} s  (buckets {cuts})\n"
        f"  torch reference  {med['torch_reference']:.2f} s  (full length "
        f"{res['episode']['padded_length']})\n"
        f"  jaxmm / reference = {res['ratio_jaxmm_over_reference']:.3f}; matmul rate "
        f"{res['matmul_gflops']:.0f} GFLOP/s (jitted f32 2048^2 GEMM)")
  checkpoint.write_json(args.out, res)
  print(f"wrote {args.out}")
  return 0



if __name__ == "__main__":
  raise SystemExit(jaxmm.cli.module_main(__name__))
