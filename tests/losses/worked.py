"""Shared helpers of the loss tests: the worked example and numpy math.

The worked example: pi_w=-10, pi_l=-12, ref_w=ref_l=-11, completion lengths 5 and 6, beta=0.1.
"""

import jax.numpy as jnp
import numpy as np

import pofx

TOL = dict(rtol=1e-6, atol=1e-6)


def softplus(x):
  return np.logaddexp(0.0, x)


def arr(*x):
  return jnp.array(x, jnp.float32)


def example(pi_w=-10.0):
  """(policy, reference) of the worked example: pi_w (default -10), pi_l -12, ref -11/-11, lengths 5/6."""
  return (
    pofx.PairLogps(arr(pi_w), arr(-12.0), arr(5.0), arr(6.0)),
    pofx.PairLogps(arr(-11.0), arr(-11.0), arr(5.0), arr(6.0)),
  )
