"""`python -m pofx.losses` (README command 1 until the training program lands)."""

import contextlib
import io
import math
import runpy

import numpy as np

import pofx
from pofx.losses import _example


def test_table_lists_every_loss():
  # `python -m pofx.losses` in this process: runpy runs the package's __main__ as `-m` does.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    runpy.run_module("pofx.losses", run_name="__main__", alter_sys=True)
  out = out.getvalue()
  for name in pofx.losses.names():
    assert f"\n{name} " in out, name
  assert f"{len(pofx.losses.names())} registered losses" in out


def test_margin_gradient_is_dl_drho():
  # DPO: d/drho softplus(-beta rho) = -beta sigmoid(-beta rho), at beta=0.1, rho=2.
  value, grad = _example.evaluate(pofx.losses.spec("dpo"))
  np.testing.assert_allclose(float(value), math.log1p(math.exp(-0.2)), rtol=1e-6)
  np.testing.assert_allclose(float(grad), -0.1 / (1 + math.exp(0.2)), rtol=1e-5)
  # IPO (summed): d/drho (rho - 5)^2 = 2 (rho - 5) = -6.
  np.testing.assert_allclose(float(_example.evaluate(pofx.losses.spec("ipo_sum"))[1]), -6.0, rtol=1e-5)
