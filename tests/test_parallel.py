"""pofx.parallel: sharding rules and helpers (in process), and multi-device equality with the
single-device step on 8 simulated CPU devices (in a subprocess: tests/parallel_check.py).

The subprocess adds `--xla_force_host_platform_device_count=8` to the inherited `XLA_FLAGS` (the
suite's compiler options, tests/conftest.py, stay) before importing JAX (this process may already
hold a 1-device JAX); it runs every group once per session.
"""

import fcntl
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from pofx import batching, parallel, perturbations, references, train
from tests import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "tests", "parallel_check.py")
TOL = 1e-5
# The modes each toy strategy runs in (tests/toy.py's TOY_MODES); AWP's own test is below.
TOY_MODES = {s: modes for s, modes in toy.TOY_MODES.items() if s != "awp"}
AWP_MODES = toy.TOY_MODES["awp"]


# ------------------------------------------------------------------------------------------------
# Multi-device results (one run of the check script per pytest session).


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    return _run_checks()
  # Under pytest-xdist the workers share one run (the session's common temp dir, a file lock).
  shared = tmp_path_factory.getbasetemp().parent / "parallel_check.json"
  with open(str(shared) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not shared.exists():
      shared.write_text(json.dumps(_run_checks()))
    return json.loads(shared.read_text())


def _run_checks():
  # One process for every group: JAX's start-up and the toy data are paid once (two concurrent
  # processes, one per core, took about 5 CPU-s more).
  env = dict(os.environ)  # parallel_check.py sets the device count and keeps the other XLA flags
  try:
    p = subprocess.run([sys.executable, CHECK], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  except subprocess.TimeoutExpired:
    pytest.fail("parallel_check.py timed out after 900 s")
  if p.returncode != 0:
    pytest.fail(f"parallel_check.py failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
  line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
  return json.loads(line)["results"]


def _check_equal(results, name):
  assert name in results, f"{name} missing; have {sorted(results)}"
  r = results[name]
  assert r["err"] <= TOL, f"{name}: parallel run differs from the single-device run by {r['err']:.3g}"
  assert r["moved"] > 1e-2, f"{name}: the single-device run hardly moved ({r['moved']}); the check is vacuous"


@pytest.mark.parametrize("strategy,mode", [(s, m) for s, modes in TOY_MODES.items() for m in modes])
def test_toy_step_equals_single_device(results, strategy, mode):
  """Params, reference state and metrics after 3 steps (SGD + momentum): every strategy under jit
  (2 data x 4 fsdp) and in shard_map or pmap or both; the frozen reference in every mode and mesh."""
  _check_equal(results, f"toy/{strategy}/{mode}")


def test_every_mode_runs_several_strategies_and_the_check_runs_this_cover(results):
  modes = {m for ms in TOY_MODES.values() for m in ms}
  for mode in modes:
    assert sum(mode in ms for ms in TOY_MODES.values()) >= (1 if mode in ("jit_8", "jit_4x2") else 4), mode
  for s, ms in TOY_MODES.items():
    assert "jit_2x4" in ms and {"shard_map_8", "pmap_8"} & set(ms), s
  ran = {k for k in results if k.startswith("toy/") and k.split("/")[1] in TOY_MODES}
  assert ran == {f"toy/{s}/{m}" for s, ms in TOY_MODES.items() for m in ms}, sorted(ran)


@pytest.mark.parametrize("mode", ["jit_2x4", "shard_map_8", "pmap_8"])
def test_the_cpu_backends_fused_adamw_equals_single_device(results, mode):
  if "fused_adamw/unavailable" in results:
    pytest.skip(results["fused_adamw/unavailable"]["reason"])
  _check_equal(results, f"fused_adamw/{mode}")


@pytest.mark.parametrize("mode", AWP_MODES)
def test_awp_equals_single_device(results, mode):
  _check_equal(results, f"toy/awp/{mode}")


@pytest.mark.parametrize("mode", ["jit_4x2", "shard_map_8"])
def test_grad_accumulation_equals_single_device(results, mode):
  _check_equal(results, f"toy/accum2/{mode}")


@pytest.mark.parametrize("mode", ["jit_2x4", "shard_map_8", "pmap_8"])
@pytest.mark.parametrize("loss", ["aot", "aot_unpaired", "beta_dpo"])
def test_batch_statistics_stay_global(results, loss, mode):
  _check_equal(results, f"batchstat/{loss}/{mode}")
  # A per-device batch gives another loss value, so equality above means global statistics.
  assert results[f"batchstat/{loss}/local_differs"]["err"] > 1e-3


def test_shard_map_gradient_trap(results):
  """Replicated params under shard_map (check_vma=True): local mean + pmean is 8x the gradient;
  pofx's grad_pmean + all-gathered loss, and pcast-to-varying + pmean, give the true gradient."""
  assert abs(results["trap/naive"]["ratio"] - 8.0) < 1e-4, results["trap/naive"]
  for name in ("pofx", "pcast", "step_grad_norm"):
    r = results[f"trap/{name}"]
    assert r["err"] <= TOL and abs(r["ratio"] - 1.0) < 1e-5, (name, r)


@pytest.mark.parametrize("run", ["jit_4x2", "jit_2x2x2_tensor", "shard_map_8"])
def test_llama_pair_batches_equal_single_device(results, run):
  """Tiny Llama, real PairBatches built per device on the host (joined with offsets for jit,
  stacked for shard_map) against one PairBatch of all pairs on one device."""
  _check_equal(results, f"llama/{run}")
  count = results[f"llama/{run}/sharded_leaves"]["count"]
  if run.startswith("jit"):
    assert count > 10  # FSDP / tensor rules really split the matrices
  else:
    assert count == 0


# ------------------------------------------------------------------------------------------------
# Sharding rules (in process, on abstract meshes).

MESH_42 = AbstractMesh((4, 2), ("data", "fsdp"))
MESH_222 = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))


def test_fsdp_shards_the_largest_divisible_dimension():
  spec = lambda shape, **kw: parallel.leaf_spec(
    "params/w", jnp.zeros(shape), AbstractMesh((2, 4), ("data", "fsdp")), **kw
  )
  assert spec((6, 16), min_fsdp_size=1) == P(None, "fsdp")
  assert spec((12, 7), min_fsdp_size=1) == P("fsdp", None)
  assert spec((16, 16), min_fsdp_size=1) == P("fsdp", None)  # ties: the first
  assert spec((7, 9), min_fsdp_size=1) == P()  # nothing divisible: replicated
  assert spec((8, 8), min_fsdp_size=65) == P()  # small leaves replicated
  assert spec((), min_fsdp_size=1) == P()
  assert parallel.leaf_spec("rng", jax.random.key(0), MESH_42, min_fsdp_size=1) == P()


def test_rules_drop_missing_or_non_dividing_axes():
  q = jnp.zeros((32, 32))
  path = "params/layers_0/attn/q_proj/kernel"
  assert parallel.leaf_spec(path, q, MESH_42, parallel.LLAMA_RULES, min_fsdp_size=1) == P("fsdp", None)
  assert parallel.leaf_spec(path, q, MESH_222, parallel.LLAMA_RULES, min_fsdp_size=1) == P("fsdp", "tensor")
  emb = jnp.zeros((97, 32))  # 97 rows: the tensor axis cannot split them
  assert parallel.leaf_spec("params/embed/embedding", emb, MESH_222, parallel.LLAMA_RULES) == P(None, "fsdp")
  # The first matching rule wins; unmatched leaves are replicated.
  rules = ((r"w$", P("data")), (r".*", parallel.FSDP))
  assert parallel.leaf_spec("params/w", jnp.zeros((8, 4)), MESH_42, rules) == P("data", None)
  assert parallel.leaf_spec("params/x", jnp.zeros((8, 4)), MESH_42, ((r"w$", P("data")),)) == P()
  with pytest.raises(ValueError, match="invalid value"):
    parallel.leaf_spec("params/w", q, MESH_42, ((r".*", "shard-it"),))


def test_rules_cover_params_optimizer_state_and_reference():
  params = toy.init(0)
  opt = optax.adam(0.1)
  ref = references.ema(0.9, toy.logps_fn)
  state = train.init_state(params, opt, ref, perturbations.none())
  specs = parallel.tree_specs(state, MESH_42, ((r"/w$", P(None, "fsdp")), (r".*", parallel.REPLICATE)))
  flat = {
    parallel.path_str(p): s for p, s in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
  }
  sharded = sorted(k for k, s in flat.items() if s != P())
  assert sharded == ["opt_state/0/mu/w", "opt_state/0/nu/w", "params/w", "ref_state/w"], sharded
  assert flat["step"] == P() and flat["rng"] == P()


def test_batch_specs():
  b = {"x": np.zeros((16, 3)), "s": np.zeros(())}
  specs = parallel.batch_specs(b, MESH_42)
  assert specs["x"] == P(("data", "fsdp")) and specs["s"] == P()
  specs = parallel.batch_specs({"x": np.zeros((2, 16, 3))}, MESH_42, grad_accum_steps=2)
  assert specs["x"] == P(None, ("data", "fsdp"))
  with pytest.raises(ValueError, match="not divisible"):
    parallel.batch_specs({"x": np.zeros((12, 3))}, MESH_42)
  # Block lists and compacted token lists index the whole batch: replicated, any length.
  from pofx import batching

  pairs = batching.prompt_shared([[1, 2]] * 8, [[3]] * 8, [[4, 5]] * 8, seq_bucket=8, completion_bucket=2)
  b = {
    "pairs": pairs,
    "attention_blocks": batching.attention_blocks(pairs, block_size=4, bucket=3),
    "scored_tokens": batching.scored_tokens(pairs, bucket=5),
  }
  specs = parallel.batch_specs(b, MESH_42)
  assert specs["pairs"].tokens == P(("data", "fsdp"))
  assert specs["attention_blocks"].query_block == P() and specs["scored_tokens"].index == P()


def test_make_mesh_and_step_validation():
  n = jax.device_count()
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data", "fsdp") and mesh.shape["data"] == n
  assert parallel.make_mesh(tensor=1).axis_names == ("data", "fsdp", "tensor")
  with pytest.raises(ValueError, match="need"):
    parallel.make_mesh(data=n + 1)
  with pytest.raises(ValueError, match="at most one -1"):
    parallel.make_mesh(data=-1, fsdp=-1)
  ref = references.frozen(toy.init(1), toy.logps_fn)
  with pytest.raises(ValueError, match="invalid mode"):
    parallel.make_train_step(toy.logps_fn, optax.sgd(0.1), mode="ddp", reference=ref)
  with pytest.raises(ValueError, match="set by the mode"):
    parallel.make_train_step(toy.logps_fn, optax.sgd(0.1), mode="jit", reference=ref, axis_name="data")
  with pytest.raises(ValueError, match="axis_name"):
    parallel.make_train_step(
      toy.logps_fn, optax.sgd(0.1), mode="shard_map", loss="beta_dpo", reference=ref, loss_hyper={"axis_name": "data"}
    )
  with pytest.raises(ValueError, match="jit=False"):
    train.make_train_step(toy.logps_fn, optax.sgd(0.1), reference=ref, axis_name="data")


def test_split_per_device_order():
  b = {"x": np.arange(8)[:, None] * np.ones((1, 3))}
  s = parallel.split_per_device(b, 4)
  assert s["x"].shape == (4, 2, 3)
  np.testing.assert_array_equal(s["x"][:, :, 0], [[0, 1], [2, 3], [4, 5], [6, 7]])
  acc = parallel.split_per_device({"x": np.arange(16).reshape(2, 8)}, 4, grad_accum_steps=2)
  np.testing.assert_array_equal(acc["x"][1], [[2, 3], [10, 11]])  # device 1: its rows of both micro-batches
  with pytest.raises(ValueError, match="not divisible"):
    parallel.split_per_device(b, 3)


def test_concat_pair_batches_keeps_each_pair_on_its_rows():
  rng = np.random.default_rng(0)
  pairs = [([1, 2, 3], list(rng.integers(1, 9, 3)), list(rng.integers(1, 9, 2))) for _ in range(3)]
  per = [batching.fused([p], [c], [r], seq_bucket=8, completion_bucket=4) for p, c, r in pairs]
  joined = parallel.concat_pair_batches(per)
  R, L = per[0].tokens.shape
  assert joined.tokens.shape == (3 * R, L) and joined.chosen_targets.shape == (3, 4)
  # Each completion token is predicted from the position just before it in its own row:
  # the token at the flat index + 1 must be the target (fused layout, independent check).
  flat = joined.tokens.reshape(-1)
  for name in ("chosen", "rejected"):
    idx, tgt, mask = (getattr(joined, f"{name}_{k}") for k in ("index", "targets", "mask"))
    on = mask > 0
    np.testing.assert_array_equal(flat[idx[on] + 1], tgt[on])
  # A process joining only its own blocks (here blocks 1 and 2) gets the same global indices.
  tail = parallel.concat_pair_batches(per[1:], start=1)
  np.testing.assert_array_equal(tail.chosen_index, joined.chosen_index[1:])
  np.testing.assert_array_equal(tail.rejected_index, joined.rejected_index[1:])
  with pytest.raises(ValueError, match="different shapes"):
    parallel.concat_pair_batches([per[0], batching.fused(*[[x] for x in pairs[0]], seq_bucket=16)])


def test_single_process_helpers():
  mesh = parallel.make_mesh()
  rows = parallel.process_rows(mesh, 8)
  np.testing.assert_array_equal(rows, np.arange(8))
  g = parallel.put_process_batch({"x": np.arange(8.0)}, mesh)
  np.testing.assert_array_equal(parallel.to_host(g)["x"], np.arange(8.0))
  np.testing.assert_array_equal(parallel.to_host({"k": jax.random.key(1)})["k"], jax.random.key_data(jax.random.key(1)))


@pytest.mark.parametrize("run", ["jit_2x2x2_tensor", "shard_map_8"])
def test_lora_adapters_off_sam_equals_single_device(results, run):
  """LoRA adapters (SAM, adapters_off reference, frozen base placed by the rules) on the tiny Llama."""
  _check_equal(results, f"llama/lora/{run}")
