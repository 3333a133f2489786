"""Multi-head attention: causal GQA with a KV cache (LLaMA) and bidirectional MHA (CLIP)."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmm.errors import InputError
from jaxmm.layers import rope as rope_lib

# The decoder's attention kernels (`LlamaConfig.attention`; `jaxmm.load(..., attention=)`):
#   "xla"    jaxmm's einsum form below (every backend; the parity reference);
#   "dot"    jax.nn.dot_product_attention, letting JAX pick (cuDNN flash attention on a GPU when
#            the shapes and dtype allow it, else XLA);
#   "cudnn"  jax.nn.dot_product_attention forced onto cuDNN's fused kernel (GPU, bf16/fp16).
IMPLEMENTATIONS = ("xla", "dot", "cudnn")


def check_implementation(impl: str) -> None:
  """InputError for an unknown implementation, or for "cudnn" off a GPU backend."""
  if impl not in IMPLEMENTATIONS:
    raise InputError(f"attention implementation {impl!r} is unknown (known: "
                     f"{', '.join(IMPLEMENTATIONS)})")
  if impl == "cudnn" and jax.default_backend() != "gpu":
    raise InputError(f"attention 'cudnn' needs a GPU backend; this one is "
                     f"{jax.default_backend()!r} (use 'xla' or 'dot')")


def attend(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale, impl: str = "xla"):
  """Softmax attention with grouped KV heads (H = G * rep). Softmax in float32.

  Masked-out keys get the most negative finite value added (not -inf), so a fully masked query
  row (a left-padding slot) yields a uniform average instead of NaN, as in transformers. `impl`:
  one of IMPLEMENTATIONS ("dot" and "cudnn" go through `jax.nn.dot_product_attention`).
  """
  if impl != "xla":
    return fused(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale, impl)
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  if t == 1 and g < h:   # decoding GQA: repeating the cache would multiply the bytes read
    return _grouped(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale)
  k, v = (jnp.repeat(a, h // g, axis=2) for a in (k_BxSxGxK, v_BxSxGxK))
  # One [T, K] x [K, S] product per (example, head), straight from the [B, T, H, K] layout, and
  # the mask as an additive bias: on XLA CPU this form ran the ViT's attention 2-3x and a GQA
  # prefill 3x faster than grouped 5-D products with `where` in microbenchmarks, and the whole
  # llava_bench prefill 151 -> 135 ms (eval/bench_prefill.py).
  s = jnp.einsum("bthk,bshk->bhts", q_BxTxHxK, k, preferred_element_type=jnp.float32) * scale
  if mask_BxTxS is not None:
    s = s + _bias(mask_BxTxS)[:, None]
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshk->bhtk", p, v).transpose(0, 2, 1, 3).reshape(b, t, h * kd)


def _bias(mask_BxTxS):
  """f32[B, T, S]: 0 where visible, the most negative finite value where masked."""
  return jnp.where(mask_BxTxS, 0.0, jnp.finfo(jnp.float32).min)


def _grouped(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale):
  """`attend` with the query heads of a KV group side by side, reading each KV head once."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(b, t, g, h // g, kd)
  s = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK, preferred_element_type=jnp.float32) * scale
  if mask_BxTxS is not None:
    s = s + _bias(mask_BxTxS)[:, None, None]
  p = jax.nn.softmax(s, axis=-1).astype(v_BxSxGxK.dtype)
  # The product lands in the probabilities' own [B, G, R, T, K] order and is transposed after:
  # asking the dot for [B, T, G, R, K] directly made XLA CPU's attention 2-3x slower.
  out = jnp.einsum("bgrts,bsgk->bgrtk", p, v_BxSxGxK)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * kd)


def fused(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask_BxTxS, scale, impl: str):
  """`attend` through jax.nn.dot_product_attention (same layout [B, T, heads, K]; GQA native)."""
  b, t, h, kd = q_BxTxHxK.shape
  mask = None if mask_BxTxS is None else mask_BxTxS[:, None]
  out = jax.nn.dot_product_attention(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, mask=mask, scale=scale,
                                     implementation="cudnn" if impl == "cudnn" else None)
  return out.reshape(b, t, h * kd)


def last_valid_slot(mask_BxTxS):
  """i32[B]: each example's last valid query slot (a valid slot sees itself: mask[b, t, t]), so
  the last prompt token of left- and right-padded prompts alike."""
  t = mask_BxTxS.shape[1]
  diag = jnp.diagonal(mask_BxTxS[:, :, :t], axis1=1, axis2=2)
  return t - 1 - jnp.argmax(diag[:, ::-1], axis=1)


def last_row(q_BxTxHxK, k_BxSxGxK, mask_BxTxS, scale):
  """f32[B, S]: the attention probabilities of each example's last valid query (its last prompt
  token, whatever the padding side), averaged over its H heads."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  last = last_valid_slot(mask_BxTxS)
  q = jnp.take_along_axis(q_BxTxHxK, last[:, None, None, None], axis=1)[:, 0]
  q = q.reshape(b, g, h // g, kd)
  row = jnp.take_along_axis(mask_BxTxS, last[:, None, None], axis=1)[:, 0]
  s = jnp.einsum("bgrk,bsgk->bgrs", q, k_BxSxGxK, preferred_element_type=jnp.float32) * scale
  s = jnp.where(row[:, None, None], s, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(s, axis=-1).mean(axis=(1, 2))


def log_probs(q_BxTxHxK, k_BxSxGxK, mask_BxTxS, scale):
  """f32[B, H, T, S]: log attention probabilities of every head (masked keys very negative)."""
  b, t, h, kd = q_BxTxHxK.shape
  g = k_BxSxGxK.shape[2]
  q = q_BxTxHxK.reshape(b, t, g, h // g, kd)
  s = jnp.einsum("btgrk,bsgk->bgrts", q, k_BxSxGxK, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask_BxTxS[:, None, None], s, jnp.finfo(jnp.float32).min)
  return jax.nn.log_softmax(s, axis=-1).reshape(b, h, t, -1)


class CausalSelfAttention(nn.Module):
  """LLaMA attention. `cache` = (k f[B,S,G,K], v f[B,S,G,K], write index i32[]) or None.

  With a cache the new keys/values are written at the index and attention runs over all S slots;
  the mask decides which slots are visible.

  `capture` is opt-in introspection, sown into the "intermediates" collection (a no-op unless the
  caller makes it mutable; with capture=() the compiled code is unchanged):
    "queries":  f[B, T, H, K] query states before RoPE;
    "attn_row": f32[B, S] attention probabilities of each example's last valid query (its last
                prompt token, left or right padded), averaged over heads. Only that row is
                computed, so the full T x S map is never materialised.
    "attn_logp": f32[B, H, T, S] log attention probabilities of every head (for training
                losses on attention, e.g. grounding).
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = False        # on q, k, v (and on o unless o_bias says otherwise)
  dtype: jnp.dtype = jnp.float32
  capture: tuple = ()
  o_bias: bool | None = None    # None: as use_bias (LLaMA); Qwen2 has q/k/v biases and none on o
  impl: str = "xla"             # the kernel (IMPLEMENTATIONS)

  @nn.compact
  def __call__(self, x_BxTxD, sin_cos, mask_BxTxS, cache=None):
    b, t, d = x_BxTxD.shape
    dense = lambda n, name: nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype, name=name)
    q = dense(self.num_heads * self.head_dim, "q")(x_BxTxD).reshape(b, t, self.num_heads, -1)
    k = dense(self.num_kv_heads * self.head_dim, "k")(x_BxTxD).reshape(b, t, self.num_kv_heads, -1)
    v = dense(self.num_kv_heads * self.head_dim, "v")(x_BxTxD).reshape(b, t, self.num_kv_heads, -1)
    if "queries" in self.capture:
      self.sow("intermediates", "queries", q)
    q, k = rope_lib.apply_rope(q, *sin_cos), rope_lib.apply_rope(k, *sin_cos)
    if cache is not None:
      k_cache, v_cache, idx = cache
      k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), idx, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), idx, axis=1)
      cache = (k, v, idx)
    if "attn_row" in self.capture:
      self.sow("intermediates", "attn_row", last_row(q, k, mask_BxTxS, self.head_dim ** -0.5))
    if "attn_logp" in self.capture:
      self.sow("intermediates", "attn_logp", log_probs(q, k, mask_BxTxS, self.head_dim ** -0.5))
    out = attend(q, k, v, mask_BxTxS, self.head_dim ** -0.5, self.impl)
    o_bias = self.use_bias if self.o_bias is None else self.o_bias
    return nn.Dense(d, use_bias=o_bias, dtype=self.dtype, name="o")(out), cache


class BidirectionalAttention(nn.Module):
  """CLIP attention: biased q/k/v/o projections, no mask."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxNxD):
    b, n, d = x_BxNxD.shape
    split = lambda y: y.reshape(b, n, self.num_heads, d // self.num_heads)
    q, k, v = (split(nn.Dense(d, dtype=self.dtype, name=nm)(x_BxNxD)) for nm in ("q", "k", "v"))
    out = attend(q, k, v, None, (d // self.num_heads) ** -0.5)
    return nn.Dense(d, dtype=self.dtype, name="o")(out)
