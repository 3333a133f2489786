"""Domain-adversarial pieces shared by CADIT and MG-FTE: gradient reversal and DANN's schedule."""
import jax
import jax.numpy as jnp


@jax.custom_vjp
def grad_reverse(x, lam):
  """Identity forward; multiplies the incoming gradient by -lam (Ganin and Lempitsky 2015)."""
  del lam
  return x


def _gr_fwd(x, lam):
  return x, lam


def _gr_bwd(lam, g):
  return (jax.tree.map(lambda t: -lam * t, g), jnp.zeros_like(lam))


grad_reverse.defvjp(_gr_fwd, _gr_bwd)


def dann_lambda(step, total, gamma: float):
  """2 / (1 + exp(-gamma p)) - 1, p = step / total: 0 -> ~1 (Ganin and Lempitsky)."""
  p = jnp.clip(step / jnp.maximum(total, 1), 0.0, 1.0)
  return 2.0 / (1.0 + jnp.exp(-gamma * p)) - 1.0
