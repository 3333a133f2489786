"""Feed-forward blocks."""
import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class SwiGLU(nn.Module):
  """LLaMA MLP: down(silu(gate(x)) * up(x))."""
  hidden: int
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxTxD):
    dense = lambda n, name: nn.Dense(n, use_bias=self.use_bias, dtype=self.dtype, name=name)
    h = jax.nn.silu(dense(self.hidden, "gate")(x_BxTxD)) * dense(self.hidden, "up")(x_BxTxD)
    return dense(x_BxTxD.shape[-1], "down")(h)


class Mlp(nn.Module):
  """Two dense layers with an activation in between (CLIP MLP, LLaVA projector)."""
  hidden: int
  out: int
  act: str = "gelu"
  use_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.hidden, use_bias=self.use_bias, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(self.out, use_bias=self.use_bias, dtype=self.dtype, name="fc2")(
        ACTIVATIONS[self.act](h))
