"""pofx_backends' entry points: the core never imports them, the start-up hook decides the platform
without starting JAX, names are validated, "auto" resolves by measurement, and a model trained
with the CPU backend's kernels gives the XLA kernels' loss and gradients."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx_backends
from pofx import batching, policy
from pofx import kernels as kernels_lib
from pofx_backends import cpu
from pofx_backends.cpu import calibration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_REASON = cpu.unavailable_reason()


def _python(code: str, tmp_path, **env) -> str:
  """Runs `code` in a fresh interpreter (repository on the path, HOME in tmp_path); its stdout."""
  full_env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": ROOT, **env}
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=300
  )
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.strip().splitlines()[-1]


def test_the_core_never_imports_a_backend_nor_runs_a_compiler(tmp_path):
  # $CXX is the compiler the CPU kernels would call first: here a script that leaves a mark.
  marker = tmp_path / "compiler_ran"
  compiler = tmp_path / "cxx"
  compiler.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
  compiler.chmod(0o755)
  code = (
    "import json, sys\nimport pofx, pofx.train, pofx.models\n"
    "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('pofx.native', 'mkl', 'pofx_backends')))))"
  )
  assert json.loads(_python(code, tmp_path, CXX=str(compiler))) == []
  assert not marker.exists()
  assert not (tmp_path / ".cache" / "pofx").exists()


def test_startup_retains_freed_memory_on_cpu_without_starting_jax(tmp_path):
  code = (
    "import json, pofx_backends\nfrom jax._src import xla_bridge\n"
    "started = pofx_backends.startup()\n"
    "print(json.dumps([started, xla_bridge.backends_are_initialized()]))"
  )
  started, initialised = json.loads(_python(code, tmp_path, JAX_PLATFORMS="cpu"))
  assert (started["platform"], started["host_memory"], initialised) == ("cpu", "retain", False)
  assert "JAX_PLATFORMS=cpu" in started["detail"]
  # Another platform named first: the allocator is left alone (and JAX is still not started).
  started, initialised = json.loads(_python(code, tmp_path, JAX_PLATFORMS="tpu,cpu"))
  assert (started["platform"], started["host_memory"], initialised) == ("tpu", "default", False)


def test_names_are_validated_and_unavailable_backends_say_why():
  assert pofx_backends.unavailable_reason("xla") is None
  assert pofx_backends.kernels("xla") is kernels_lib.XLA
  with pytest.raises(
    ValueError, match=r"kernels='cuda' is not a kernel backend; allowed: \('xla', 'cpu', 'gpu', 'tpu'\)"
  ):
    pofx_backends.unavailable_reason("cuda")
  with pytest.raises(ValueError, match=r"kernels='cuda' is not a kernel backend; allowed: \('auto', 'xla', 'cpu'"):
    pofx_backends.resolve("cuda")
  with pytest.raises(ValueError, match="resolve it first"):
    pofx_backends.kernels("auto")
  with pytest.raises(ValueError, match="takes no options"):
    pofx_backends.kernels("xla", blas="mkl")
  for name in sorted({"gpu", "tpu"} - {jax.default_backend()}):  # on a device, its own backend can run
    reason = pofx_backends.unavailable_reason(name)
    assert isinstance(reason, str) and reason
    with pytest.raises(
      ValueError,
      match=rf"kernels='{name}' cannot run here: .*Allowed: \('auto', 'xla', 'cpu', "
      r"'gpu', 'tpu'\); runnable here: \['auto', 'xla'",
    ):
      pofx_backends.resolve(name)
    with pytest.raises(ValueError, match=rf"kernels='{name}' cannot run here"):
      pofx_backends.kernels(name)
  assert pofx_backends.resolve("xla") == ("xla", {"requested": "xla", "platform": "cpu", "rule": "named"})


def test_cpu_reason_names_the_jax_platform(monkeypatch):
  # The JAX backend decides, not the host's instruction set: on a GPU backend the CPU kernels
  # cannot run even on an AVX-512 host.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert "JAX's CPU platform and this process's JAX backend is 'gpu'" in cpu.unavailable_reason()
  assert pofx_backends.resolve("auto")[0] in ("gpu", "xla")


@pytest.mark.skipif(CPU_REASON is not None, reason=f"{CPU_REASON}")
@pytest.mark.parametrize("faster", ["xla", "cpu"])
def test_auto_on_cpu_takes_the_faster_measured_candidate(faster):
  measured = []

  def measure(kernels):
    measured.append(kernels.name)
    return 1.0 if kernels.name == faster else 2.0

  name, details = pofx_backends.resolve("auto", measure=measure)
  assert name == faster and sorted(measured) == ["cpu", "xla"]
  assert details["seconds"] == {"xla": 1.0 if faster == "xla" else 2.0, "cpu": 1.0 if faster == "cpu" else 2.0}
  assert details["platform"] == "cpu" and details["requested"] == "auto"
  json.dumps(details)


@pytest.mark.skipif(CPU_REASON is not None, reason=f"{CPU_REASON}")
def test_default_calibration_times_both_candidates():
  name, details = pofx_backends.resolve("auto")
  assert name == min(details["seconds"], key=details["seconds"].get)
  assert all(0 < s < 30 for s in details["seconds"].values()), details
  k = pofx_backends.kernels("cpu")
  assert k.name == "cpu" and isinstance(k.dot_general, cpu.BlasDotGeneral)
  assert calibration.measure(kernels_lib.XLA, calibration.Shapes(rows=1, length=128, layers=1), repeats=1) > 0


def _pairs(seed):
  rng = np.random.default_rng(seed)
  ids = lambda k: rng.integers(1, 97, k).tolist()
  lens = [(int(rng.integers(1, 60)), int(rng.integers(1, 70)), int(rng.integers(1, 70))) for _ in range(4)]
  return [ids(p) for p, _, _ in lens], [ids(c) for _, c, _ in lens], [ids(r) for _, _, r in lens]


@pytest.mark.skipif(CPU_REASON is not None, reason=f"{CPU_REASON}")
@pytest.mark.parametrize("attention", ["dense", "block_sparse"])
def test_tiny_model_dpo_loss_and_gradients_with_cpu_kernels_equal_xla(attention):
  from pofx import models
  from pofx.models import llama

  config = llama.preset("tiny", head_dim=16)  # a head dimension the attention kernels support
  params = llama.init_params(config, jax.random.key(0))
  b = batching.packed(*_pairs(3), length_bucket=64, completion_bucket=8)
  batch = {"pairs": b}
  if attention == "block_sparse":
    batch["attention_blocks"] = batching.attention_blocks(b, block_size=64, bucket=8)
  out = {}
  for name, kernels in (("xla", kernels_lib.XLA), ("cpu", pofx_backends.kernels("cpu"))):
    model = models.make(config, kernels=kernels)
    fn = policy.make_logps_fn(model.apply, model.head, kernels=kernels)

    def loss(params, batch):
      lp = fn(params, batch)  # noqa: B023
      return -jnp.sum(jax.nn.log_sigmoid(0.5 * (lp.chosen - lp.rejected)))

    step = jax.jit(jax.value_and_grad(loss))
    out[name] = step(params, batch)
    text = step.lower(params, batch).as_text()
    assert ("pofx_blas_matmul" in text) == (name == "cpu")
    assert ("pofx_block_sparse_attention" in text) == (name == "cpu" and attention == "block_sparse")
  np.testing.assert_allclose(out["cpu"][0], out["xla"][0], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(out["cpu"][1]), jax.tree.leaves(out["xla"][1])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()) + 1e-8)


def test_threaded_conv_compiler_options_take_only_the_convolution_from_ynnpack():
  # XLA:CPU's default compile hands a convolution, a product and a reduction each to a YNNPACK
  # fusion; THREADED_CONV_COMPILER_OPTIONS must leave the convolution to XLA's own kernel (an
  # instruction of the entry computation) and the other two with YNNPACK, with the same values.
  # The bench U-Net's shapes: XLA:CPU keeps small convolutions (4 images of 8x8) for its own kernel.
  x = jax.random.normal(jax.random.key(0), (16, 16, 16, 32), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32), jnp.float32)
  m = jax.random.normal(jax.random.key(2), (32, 32), jnp.float32)

  def f(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return (y.reshape(-1, 32) @ m).sum(axis=0), jnp.tanh(y).sum(axis=(1, 2))

  lowered = jax.jit(f).lower(x, w, m)

  def entry(compiled):
    text = compiled.as_text()
    return text[text.index("ENTRY") :]

  default, threaded = lowered.compile(), lowered.compile(compiler_options=cpu.THREADED_CONV_COMPILER_OPTIONS)
  assert " convolution(" not in entry(default) and "ynn_fusion" in entry(default)
  assert " convolution(" in entry(threaded)
  assert entry(threaded).count("ynn_fusion") >= 2  # the product and a reduction
  for got, want in zip(threaded(x, w, m), default(x, w, m)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-3)


def test_low_memory_compiler_options_are_known_to_xla_and_keep_the_values():
  # XLA refuses an unknown compile option ("No such compile option"), so this pins that the names
  # exist in the installed jaxlib; the values are XLA's own compile's, up to summation order.
  x = jax.random.normal(jax.random.key(0), (16, 8), jnp.float32)
  lowered = jax.jit(lambda a: jnp.tanh(a) @ a.T + jnp.sum(jax.nn.silu(a), axis=1)).lower(x)
  want = np.asarray(lowered.compile()(x))
  got = np.asarray(lowered.compile(compiler_options=cpu.LOW_MEMORY_COMPILER_OPTIONS)(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
