"""The contract every registered loss must meet; walks the whole registry.

A loss cannot join the registry without passing this: jittable, `[B]` output, jit == eager,
finite values and gradients (also at margins of +-1e4 in float32 and bfloat16), gradients
that agree with finite differences, deterministic given its key, a docstring with a reference.
"""

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import pofx
from tests.losses import registry_inputs as ri

# The canonical names, and the TRL loss_types whose formula is not the canonical function (the
# others take TRL's every-field entry around the same function object, already walked under the
# canonical name).
NAMES = pofx.losses.names() + [
  f"trl.{t}"
  for t in pofx.losses.trl.names()
  if pofx.losses.trl.get(t).__wrapped__ is not pofx.losses.get(pofx.losses.trl.canonical(t))
]
KEY = jax.random.key(0)


def _call(spec, policy, reference, kwargs):
  out = spec.fn(policy, reference, **kwargs)
  return out[0] if "state" in spec.requires else out


def _split(policy):
  """Differentiable log-prob leaves of a PairLogps/ListLogps, and a function rebuilding it."""
  if isinstance(policy, pofx.ListLogps):
    leaves = {"logps": policy.logps}
  else:
    leaves = {
      k: getattr(policy, k)
      for k in (
        "chosen",
        "rejected",
        "chosen_token_logps",
        "rejected_token_logps",
        "chosen_eos_logps",
        "rejected_eos_logps",
      )
      if getattr(policy, k) is not None
    }
  return leaves, lambda new: policy.replace(**new)


def test_every_requirement_has_a_builder():
  handled = {
    "lengths",
    "tokens",
    "log_sum_sq_probs",
    "key",
    "state",
    "scores",
    "turn_ids",
    "risk",
    "list",
    "kl",
    "diff_masks",
    "embeddings",
    "segments",
    "eos_logps",
    "companions",
  }
  assert set(pofx.losses.REQUIREMENTS) <= handled


def test_registry_is_read_only_and_sorted():
  for registry in (pofx.losses.REGISTRY, pofx.losses.trl.REGISTRY):
    assert list(registry) == sorted(registry)
    with pytest.raises(TypeError):
      registry["new"] = pofx.losses.REGISTRY["dpo"]


def test_unknown_name_lists_allowed():
  with pytest.raises(ValueError, match="allowed: .*'dpo'.*'trl.sigmoid'"):
    pofx.losses.get("dpoo")
  with pytest.raises(ValueError, match="allowed: .*'sigmoid'"):
    pofx.losses.get("trl.dpo")
  with pytest.raises(ValueError, match="formula is 'dpo'"):  # pairwise InfoNCA with hard labels is DPO
    pofx.losses.get("infonca")


@pytest.mark.parametrize("name", pofx.losses.names())
def test_attribute_is_get(name):
  # `pofx.losses.<name>` is `pofx.losses.get("<name>")` for every canonical name.
  assert getattr(pofx.losses, name) is pofx.losses.get(name) is pofx.losses.spec(name).fn
  assert pofx.losses.spec(name).name == name


def test_one_name_per_formula():
  # No two canonical names hold the same function, and no canonical name is a TRL name of another formula.
  fns = [pofx.losses.get(n) for n in pofx.losses.names()]
  assert len({id(f) for f in fns}) == len(fns)
  for loss_type in pofx.losses.trl.names():
    canonical = pofx.losses.trl.canonical(loss_type)
    assert loss_type == canonical or loss_type not in pofx.losses.REGISTRY, loss_type


def test_unknown_hyperparameter_lists_allowed():
  policy, reference, _ = ri.build(pofx.losses.spec("dpo"), KEY)
  with pytest.raises(ValueError, match=r"unknown argument\(s\) \['betta'\]; allowed: \['beta'\]"):
    pofx.losses.batch_loss("dpo", policy, reference, betta=0.1)


def test_check_values_traces_every_loss_with_its_example_values():
  # configs/validate.py checks a config's loss_hyper this way before any compute.
  for name in NAMES:
    pofx.losses.check_values(name, dict(pofx.losses.spec(name).example_hyper))
  with pytest.raises(ValueError, match=r"dpo_shift: invalid lam=2.0; allowed: \[0.0, 1.0\]"):
    pofx.losses.check_values("dpo_shift", {"lam": 2.0})


@pytest.mark.parametrize("name", NAMES)
def test_documented(name):
  spec = pofx.losses.spec(name)
  doc = inspect.getdoc(spec.fn) or ""
  assert len(doc) > 80, f"{name}: docstring too short"
  assert "arXiv" in doc or "References" in doc or "TRL" in doc, f"{name}: docstring names no reference"
  assert spec.source, name


@pytest.mark.parametrize("name", NAMES)
def test_contract(name):
  spec = pofx.losses.spec(name)
  policy, reference, kwargs = ri.build(spec, KEY)

  eager = spec.fn(policy, reference, **kwargs)
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array) or k == "state"}
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  jitted = jax.jit(lambda p, r, kw: spec.fn(p, r, **kw, **static))(policy, reference, arrays)
  if "state" in spec.requires:
    assert isinstance(eager, tuple) and len(eager) == 2, f"{name}: stateful losses return (losses, state)"
    chex.assert_trees_all_close(eager[1], jitted[1], rtol=1e-6, atol=1e-6)
    eager, jitted = eager[0], jitted[0]
  chex.assert_shape(eager, (ri.B,))
  chex.assert_tree_all_finite(eager)
  np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-6)

  # Deterministic given the key (and the state).
  again = _call(spec, policy, reference, kwargs)
  np.testing.assert_array_equal(np.asarray(eager), np.asarray(again))

  # Reference-optional losses also run reference-free.
  if spec.reference == "optional":
    p2, _, kw2 = ri.build(spec, KEY, with_reference=False)
    chex.assert_tree_all_finite(_call(spec, p2, None, kw2))

  # Batch reduction is a finite scalar.
  out = pofx.losses.batch_loss(name, policy, reference, **kwargs)
  scalar = out[0] if "state" in spec.requires else out
  chex.assert_shape(scalar, ())
  chex.assert_tree_all_finite(scalar)


# Losses that detach a function of their own inputs (LossSpec.detached_by_design): finite
# differences are taken where the detached quantity does not move. WPO's weights come from the
# per-token arrays, so its sums are differentiated with the token arrays held fixed; beta-DPO's
# detached batch beta is constant when its adaptation `a` is 0 (the filter keeps its draw); BMC's
# weights 1 + m min(1/p, delta) are 1 + m for every p when delta = 1.
FD_WHERE_DETACHED_IS_CONSTANT = {
  "wpo": {"leaves": ("chosen", "rejected")},
  "beta_dpo": {"hyper": {"a": 0.0}},
  "bmc": {"hyper": {"delta": 1.0}},
  "sgdpo": {"leaves": ("chosen", "rejected")},
  "full_step_dpo": {"hyper": {"token_rate": 0.0}, "leaves": ("chosen_token_logps", "rejected_token_logps")},
  "kto_unpaired": {"leaves": ("chosen",)},
  # Adaptive-DPO: k = 0 makes the weight 1 / c and margin "none" drops the detached margin and centring.
  "adaptive_dpo": {"hyper": {"k": 0.0, "margin": "none"}},
}


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_finite_differences(name):
  spec = pofx.losses.spec(name)
  policy, reference, kwargs = ri.build(spec, KEY)
  leaves, rebuild = _split(policy)
  grads = jax.grad(lambda new: jnp.sum(_call(spec, rebuild(new), reference, kwargs)))(leaves)
  chex.assert_tree_all_finite(grads)
  if spec.detached_by_design:
    assert name in FD_WHERE_DETACHED_IS_CONSTANT, f"{name}: say where its detached quantity is constant"
    override = FD_WHERE_DETACHED_IS_CONSTANT[name]
    kwargs = {**kwargs, **override.get("hyper", {})}
    if "leaves" in override:
      fixed = {k: v for k, v in leaves.items() if k not in override["leaves"]}
      leaves = {k: v for k, v in leaves.items() if k in override["leaves"]}
      rebuild_all = rebuild
      rebuild = lambda new: rebuild_all({**fixed, **new})

  def objective(new):
    return jnp.sum(_call(spec, rebuild(new), reference, kwargs) * jnp.arange(1.0, ri.B + 1.0))

  # float32 finite differences: a loose tolerance, but a wrong derivative is off by O(1).
  check_grads(
    objective,
    (jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), leaves),),
    order=1,
    modes=["rev"],
    eps=1e-2,
    atol=5e-2,
    rtol=5e-2,
  )


def _extreme_inputs(spec, sign, dtype):
  policy, reference, kwargs = ri.build(spec, KEY)
  if "list" in spec.requires:
    big = jnp.where(jnp.arange(ri.K) == 0, -1.0, -1e4) if sign > 0 else jnp.where(jnp.arange(ri.K) == 0, -1e4, -1.0)
    policy = policy.replace(logps=jnp.broadcast_to(big, policy.logps.shape).astype(dtype))
    if reference is not None:
      reference = reference.replace(logps=jnp.full_like(reference.logps, -1.0).astype(dtype))
    return policy, reference, kwargs
  ext_policy, ext_reference = ri.extreme_pair(sign, dtype, eos="eos_logps" in spec.requires)
  if "companions" in spec.requires:
    ext_reference = ri.with_companions(ext_reference, 0)
    ext_reference = ext_reference.replace(
      companion_chosen=ext_reference.companion_chosen.astype(dtype),
      companion_rejected=ext_reference.companion_rejected.astype(dtype),
    )
  return ext_policy, (ext_reference if reference is not None else None), kwargs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["plus1e4", "minus1e4"])
@pytest.mark.parametrize("name", NAMES)
def test_finite_at_extreme_margins(name, sign, dtype):
  spec = pofx.losses.spec(name)
  policy, reference, kwargs = _extreme_inputs(spec, sign, dtype)
  leaves, rebuild = _split(policy)

  def objective(new):
    return jnp.sum(_call(spec, rebuild(new), reference, kwargs).astype(jnp.float32))

  value, grads = jax.jit(jax.value_and_grad(objective))(leaves)
  assert np.isfinite(float(value)), f"{name}: loss not finite at margin {sign:+}1e4 ({dtype.__name__})"
  chex.assert_tree_all_finite(grads)


# The catalogue's canonical names (the GPO family, the formulas TRL has, the literature methods) and
# TRL 1.16's fifteen loss types in the compatibility namespace.
REQUIRED = {
  "dpo",
  "slic",
  "ipo",
  "ipo_sum",
  "exponential",
  "truncated_quadratic",
  "savage",
  "exo_pair",
  "bco_pair",
  "sppo_hard",
  "aot",
  "aot_unpaired",
  "apo_zero",
  "apo_down",
  "discopop",
  "sft",
  "ld_dpo",
  "wpo",
  "f_dpo",
  "simpo",
  "cpo",
  "orpo",
  "repo",
  "dpop",
  "odpo",
  "beta_dpo",
  "focalpo",
  "cdpo",
  "robust_dpo",
  "rpo",
  "irpo",
  "sampo",
  "sgdpo",
  "ln_dpo",
  "dpo_shift",
  "nca",
  "nca_kway",
  "infonca_kway",
  "una",
  "gamma_simpo",
  "gamma_dpo",
  "dmpo",
  "ra_dpo",
  "mappo",
  "asft",
  "kto",
  "dpo_nll_delta_l",
  "mipo",
  "ilr_dpo",
  "flex_dpo",
  "madpo",
  "bmc",
  "sem_dpo",
  "two_d_dpo",
  "full_step_dpo",
  "gdpo",
}
REQUIRED_TRL = {
  "sigmoid",
  "hinge",
  "ipo",
  "exo_pair",
  "nca_pair",
  "robust",
  "bco_pair",
  "sppo_hard",
  "aot",
  "aot_unpaired",
  "apo_zero",
  "apo_down",
  "discopop",
  "sft",
  "sigmoid_norm",
}


def test_required_names_are_registered():
  assert REQUIRED <= set(pofx.losses.names()), sorted(REQUIRED - set(pofx.losses.names()))
  assert REQUIRED_TRL == set(pofx.losses.trl.names())


def test_every_loss_that_reads_scores_declares_its_score_domain():
  # A program checks its data against the domain before training (the world's raw gold rewards
  # are refused for the restricted domains); the registry's example scores lie inside it.
  readers = [n for n in pofx.losses.names() if "scores" in pofx.losses.spec(n).requires]
  assert sorted(readers) == ["diffusion_kto", "kto_unpaired", "madpo", "mappo", "odpo", "smpo", "una"]
  assert [n for n in readers if pofx.losses.spec(n).score_domain.any_real] == ["madpo", "smpo"]  # raw rewards
  for name in readers:
    spec = pofx.losses.spec(name)
    assert spec.score_domain is not None and spec.score_domain.text
    _, _, kwargs = ri.build(spec, KEY)
    pofx.losses.check_scores(name, np.asarray(kwargs["chosen_scores"]), np.asarray(kwargs["rejected_scores"]))
  with pytest.raises(ValueError, match="needs score_domain"):
    pofx.losses.LossSpec("x", pofx.losses.dpo, "test", "none", requires=frozenset({"scores"}))
