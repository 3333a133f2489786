"""Normalisation layers."""
import flax.linen as nn
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: statistics in float32, cast back, then scale (as transformers does)."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x_BxTxD):
    scale = self.param("scale", nn.initializers.ones, (x_BxTxD.shape[-1],))
    x = x_BxTxD.astype(jnp.float32)
    x = x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps))
    return scale.astype(x_BxTxD.dtype) * x.astype(x_BxTxD.dtype)
