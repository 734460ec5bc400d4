"""Diffusion-DPO through pofx's train step: pair errors against numpy and against the diffusers
research example's loss in torch, and the composition with SAM and a synced reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pofx
from pofx.diffusion import pairs, schedules
from tests.diffusion import standin

B, H, W, C = 4, 4, 4, 1  # 3 real pairs and 1 padding pair
BETA = 5000.0
# beta = 5000 multiplies the float32 rounding of the errors e (~1e-7 e) by 2500: the loss is compared
# within 1e-5 where the denoiser is close to its target, so that e is small. A near-identity stand-in
# at t >= 900 (x_t ~ eps) does it: e ~ 1e-4, and policy and reference still differ.
T_RANGE = (900, 1000)


def _near_identity(key):
  p = standin.init(key, scale=0.01)
  return dict(p, w=p["w"].at[1, 1, 0, 0].add(1.0))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  keys = jax.random.key_data(jax.random.split(jax.random.key(seed), B))
  return pairs.ImagePairs(
    chosen=jnp.asarray(rng.uniform(-1, 1, (B, H, W, C)), jnp.float32),
    rejected=jnp.asarray(rng.uniform(-1, 1, (B, H, W, C)), jnp.float32),
    class_labels=jnp.asarray([0, 1, 2, 0], jnp.int32),
    noise_keys=keys,
    pair_mask=jnp.asarray([1, 1, 1, 0], jnp.float32),
  )


def test_timesteps_and_noise_are_drawn_per_pair_from_its_key():
  """t ~ U{lo..hi-1} from the first half of the pair's split key, eps ~ N(0, I) from the second,
  written here with jax.random directly."""
  s = schedules.linear()
  keys = _batch().noise_keys
  t, eps = pairs.timesteps_and_noise(keys, (H, W, C), s)
  t_r, eps_r = pairs.timesteps_and_noise(keys, (H, W, C), s, timestep_range=(100, 200))

  @jax.jit
  @jax.vmap
  def direct(key):
    k_t, k_eps = jax.random.split(key)
    draws = jax.random.randint(k_t, (), 0, 1000), jax.random.randint(k_t, (), 100, 200)
    return draws, jax.random.normal(k_eps, (H, W, C))

  (want_t, want_t_r), want_eps = direct(keys)
  np.testing.assert_array_equal(np.asarray(t), np.asarray(want_t))
  np.testing.assert_array_equal(np.asarray(t_r), np.asarray(want_t_r))
  assert np.all((100 <= np.asarray(t_r)) & (np.asarray(t_r) < 200)) and len(set(np.asarray(t).tolist())) == B
  np.testing.assert_array_equal(np.asarray(eps), np.asarray(want_eps))
  np.testing.assert_array_equal(np.asarray(eps_r), np.asarray(want_eps))
  with pytest.raises(ValueError, match=r"timestep_range=\(0, 1001\).*0 <= lo < hi <= 1000"):
    pairs.make_logps_fn(standin.denoise, s, timestep_range=(0, 1001))


def _np_errors(params, batch, alphas_cumprod, prediction_type="epsilon"):
  """Per-image mean squared errors of the stand-in, all in numpy (float64) from the drawn t, eps."""
  drawn = pairs.timesteps_and_noise(batch.noise_keys, (H, W, C), schedules.linear(), timestep_range=T_RANGE)
  t, eps = (np.asarray(v, np.float64) for v in drawn)
  t = t.astype(int)
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  a = np.asarray(alphas_cumprod, np.float64)[t][:, None, None, None]
  out = []
  for x0 in (np.asarray(batch.chosen, np.float64), np.asarray(batch.rejected, np.float64)):
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * eps
    xp = np.pad(x_t, ((0, 0), (1, 1), (1, 1), (0, 0)))
    pred = sum(
      np.einsum("bhwc,co->bhwo", xp[:, i : i + H, j : j + W], p["w"][i, j]) for i in range(3) for j in range(3)
    )
    pred = (
      pred
      + p["b"]
      + (standin.embed_np(t) @ p["wt"])[:, None, None]
      + p["cls"][np.asarray(batch.class_labels)][:, None, None]
    )
    y = eps if prediction_type == "epsilon" else np.sqrt(a) * eps - np.sqrt(1 - a) * x0
    out.append(((pred - y) ** 2).mean(axis=(1, 2, 3)))
  return out


@pytest.fixture(scope="module")
def dpo_step():
  """One Diffusion-DPO step of the stand-in against a frozen reference with other weights."""
  s = schedules.linear()
  logps_fn = pairs.make_logps_fn(standin.denoise, s, timestep_range=T_RANGE)
  policy = _near_identity(jax.random.key(0))
  ref = _near_identity(jax.random.key(1))
  reference = pairs.check_reference(pofx.references.frozen(ref, logps_fn))
  step = pofx.train.make_train_step(
    logps_fn, optax.adamw(1e-3), loss="dpo", loss_hyper={"beta": BETA}, reference=reference
  )
  state = pofx.train.init_state(policy, optax.adamw(1e-3), reference, pofx.perturbations.none(), loss="dpo")
  batch = _batch()
  _, metrics = step(state, {"pairs": batch}, jax.random.key(0))
  return dict(policy=policy, ref=ref, batch=batch, metrics=metrics, schedule=s)


def test_dpo_loss_is_the_diffusion_dpo_formula(dpo_step):
  """The step's loss equals -log sigmoid(-beta/2 ((e_w - e_ref_w) - (e_l - e_ref_l))) averaged
  over the real pairs, with every error computed in numpy; the padding pair is finite and left out."""
  ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  b = dpo_step["batch"]
  e_w, e_l = _np_errors(dpo_step["policy"], b, ac)
  r_w, r_l = _np_errors(dpo_step["ref"], b, ac)
  inside = -0.5 * BETA * ((e_w - r_w) - (e_l - r_l))
  per_pair = np.logaddexp(0.0, -inside)  # -log sigmoid
  assert np.all(np.isfinite(per_pair)) and np.ptp(inside[:3]) > 0.1, inside  # non-trivial pairs
  np.testing.assert_allclose(float(dpo_step["metrics"]["loss"]), per_pair[:3].mean(), atol=1e-5, rtol=1e-5)
  # v-prediction: the errors are against v = sqrt(abar) eps - sqrt(1 - abar) x0.
  s_v = schedules.linear(prediction_type="v_prediction")
  v_w, v_l = jax.jit(lambda p: pairs.pair_errors(standin.denoise, p, s_v, b, timestep_range=T_RANGE))(
    dpo_step["policy"]
  )
  want_w, want_l = _np_errors(dpo_step["policy"], b, ac, "v_prediction")
  np.testing.assert_allclose(np.asarray(v_w), want_w, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(v_l), want_l, rtol=1e-5)
  # The step's log-prob metrics are the means of chosen = -e_w/2 and rejected = -e_l/2 over real pairs.
  np.testing.assert_allclose(float(dpo_step["metrics"]["logps/chosen"]), -0.5 * e_w[:3].mean(), rtol=1e-5)
  np.testing.assert_allclose(float(dpo_step["metrics"]["logps/rejected"]), -0.5 * e_l[:3].mean(), rtol=1e-5)


def test_equals_the_diffusers_research_example_in_torch(dpo_step):
  """The baseline's `step` formula (diffusers' `train_diffusion_dpo.py`: `DDPMScheduler.add_noise`,
  per-image MSE against the noise, `-logsigmoid(-beta/2 ((e_w - e_l) - (r_w - r_l)))`) with the
  stand-in's torch twin on the same images, noise and timesteps."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  b = dpo_step["batch"]
  t, eps = pairs.timesteps_and_noise(b.noise_keys, (H, W, C), dpo_step["schedule"], timestep_range=T_RANGE)
  real = slice(0, 3)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a)[real].transpose(0, 3, 1, 2)))
  sched = diffusers.DDPMScheduler(num_train_timesteps=1000)
  x0 = torch.cat([nchw(b.chosen), nchw(b.rejected)])
  noise = nchw(eps).repeat(2, 1, 1, 1)
  tt = torch.from_numpy(np.asarray(t)[real].astype(np.int64)).repeat(2)
  xt = sched.add_noise(x0, noise, tt)
  cls = torch.from_numpy(np.asarray(b.class_labels)[real].astype(np.int64)).repeat(2)
  err = (standin.torch_denoise(dpo_step["policy"], xt, tt, cls) - noise).pow(2).mean(dim=[1, 2, 3])
  e_w, e_l = err.chunk(2)
  rerr = (standin.torch_denoise(dpo_step["ref"], xt, tt, cls) - noise).pow(2).mean(dim=[1, 2, 3])
  r_w, r_l = rerr.chunk(2)
  inside = -0.5 * BETA * ((e_w - e_l) - (r_w - r_l))
  loss = -torch.nn.functional.logsigmoid(inside).mean()
  np.testing.assert_allclose(float(dpo_step["metrics"]["loss"]), float(loss), atol=1e-5, rtol=1e-5)


def test_sam_with_a_synced_reference_trains_and_cached_is_refused():
  """SAM (rho 0.05) and a TR-DPO reference (tau 2) with Diffusion-DPO: three jitted steps with
  fresh noise keys give finite, changing losses, and the reference moves at its sync step; a cached
  reference is refused before anything runs."""
  s = schedules.linear(prediction_type="v_prediction")
  logps_fn = pairs.make_logps_fn(standin.denoise, s, timestep_range=(0, 500))
  reference = pairs.check_reference(pofx.references.synced(alpha=0.5, tau=2, logps_fn=logps_fn))
  perturbation = pofx.perturbations.sam(rho=0.05)
  opt = optax.adamw(1e-2)
  step = pofx.train.make_train_step(
    logps_fn, opt, loss="dpo", loss_hyper={"beta": BETA}, reference=reference, perturbation=perturbation
  )
  state = pofx.train.init_state(standin.init(jax.random.key(0)), opt, reference, perturbation, loss="dpo")
  ref0 = np.asarray(state.ref_state["w"])
  losses = []
  for i in range(3):
    state, metrics = step(state, {"pairs": _batch(i)}, jax.random.key(i))
    losses.append(float(metrics["loss"]))
    assert float(metrics["nonfinite"]) == 0.0
  assert all(np.isfinite(losses)) and len(set(losses)) == 3, losses
  assert losses[0] == pytest.approx(np.log(2.0), abs=1e-6)  # policy == reference at the start
  assert not np.allclose(np.asarray(state.ref_state["w"]), ref0)  # synced at step 2
  with pytest.raises(ValueError, match="reference 'cached'.*draws new timesteps and noise"):
    pairs.check_reference(pofx.references.cached("f", "f"))


def test_bad_pairs_are_refused():
  s = schedules.linear()
  fn = pairs.make_logps_fn(standin.denoise, s)
  b = _batch()
  with pytest.raises(ValueError, match=r"chosen \(4, 4, 4, 1\) and rejected \(4, 4, 4\)"):
    fn(standin.init(jax.random.key(0)), {"pairs": b._replace(rejected=b.rejected[..., 0])})
  with pytest.raises(TypeError, match="must be a pofx.diffusion.pairs.ImagePairs"):
    fn(standin.init(jax.random.key(0)), {"pairs": (b.chosen, b.rejected)})
  with pytest.raises(ValueError, match="compute_dtype"):
    pairs.make_logps_fn(standin.denoise, s, compute_dtype=jnp.int32)


def test_rank_dpo_step_on_lists_shares_one_timestep_and_noise_per_list():
  """RankDPO through the train step: `make_list_logps_fn` gives each list's K = 3 images the list's
  timestep and noise (the errors equal numpy's for pairs (image 0, image k) under the same keys), and
  the step's loss is the DCG-weighted pairwise loss on those numpy errors, written out by hand."""
  s = schedules.linear()
  logps_fn = pairs.make_list_logps_fn(standin.denoise, s, timestep_range=T_RANGE)
  policy, ref = _near_identity(jax.random.key(0)), _near_identity(jax.random.key(1))
  reference = pairs.check_reference(pofx.references.frozen(ref, logps_fn))
  step = pofx.train.make_train_step(
    logps_fn, optax.adamw(1e-3), loss="rank_dpo", loss_hyper={"beta": BETA}, reference=reference
  )
  state = pofx.train.init_state(policy, optax.adamw(1e-3), reference, pofx.perturbations.none(), loss="rank_dpo")
  b = _batch()
  third = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (B, H, W, C)), jnp.float32)
  lists = pairs.ImageLists(jnp.stack([b.chosen, b.rejected, third], axis=1), b.class_labels, b.noise_keys)
  phi = np.array([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5], [0.5, 0.5, 0.5]])  # the last: padding
  _, metrics = step(state, {"lists": lists, "scores": jnp.asarray(phi), "pair_mask": b.pair_mask}, jax.random.key(0))
  ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  other = b._replace(rejected=third)
  e = np.stack(_np_errors(policy, b, ac) + _np_errors(policy, other, ac)[1:], axis=1)  # [B, 3]
  e_ref = np.stack(_np_errors(ref, b, ac) + _np_errors(ref, other, ac)[1:], axis=1)
  lr = -0.5 * (e - e_ref)
  want = []
  for n in range(3):
    pos = 1 + np.argsort(np.argsort(-lr[n]))  # predicted positions (distinct here)
    d = 1.0 / np.log1p(pos)
    loss = 0.0
    for i in range(3):
      for j in range(3):
        if phi[n, i] > phi[n, j]:
          w = abs(2 ** phi[n, i] - 2 ** phi[n, j]) * abs(d[i] - d[j])
          loss += w * np.logaddexp(0.0, -BETA * (lr[n, i] - lr[n, j]))
    want.append(loss)
  assert len({round(float(x), 8) for x in lr[:3].ravel()}) == 9 and np.ptp(BETA * lr[:3]) > 0.1
  np.testing.assert_allclose(float(metrics["loss"]), np.mean(want), rtol=1e-4, atol=1e-6)
  # The metrics' chosen / rejected are each list's best- and worst-scored images.
  best, worst = np.argmax(phi[:3], axis=1), np.argmin(phi[:3], axis=1)
  np.testing.assert_allclose(float(metrics["logps/chosen"]), np.mean(-0.5 * e[np.arange(3), best]), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["logps/rejected"]), np.mean(-0.5 * e[np.arange(3), worst]), rtol=1e-5)
  # Lists compose with the other reference strategies and perturbations: the whole step traces
  # (abstractly, nothing compiled) with a synced reference, SAM with m-sharpness (one ascent per
  # list) and two accumulated micro-batches of two lists.
  b3 = {"lists": lists, "scores": jnp.asarray(phi), "pair_mask": b.pair_mask}
  ref_s, pert, opt = pofx.references.synced(0.5, 2, logps_fn), pofx.perturbations.sam(0.05, m=1), optax.adamw(1e-3)
  st = pofx.train.init_state(policy, opt, ref_s, pert, loss="rank_dpo")
  fn = pofx.train.make_train_step(
    logps_fn, opt, loss="rank_dpo", reference=ref_s, perturbation=pert, grad_accum_steps=2, jit=False
  )
  half = lambda i: jax.tree.map(lambda x: x[2 * i : 2 * i + 2], b3)
  new_state, m = jax.eval_shape(fn, st, pofx.train.stack_microbatches([half(0), half(1)]), jax.random.key(0))
  assert m["loss"].shape == () and jax.tree.structure(new_state) == jax.tree.structure(st)
  with pytest.raises(ValueError, match="takes K-way lists .ListLogps., which a cached reference does not hold"):
    pofx.train.validate("rank_dpo", pofx.references.cached("f", "f"), {"beta": BETA})
  with pytest.raises(ValueError, match="gradient_field=True reads a pair's chosen"):
    pofx.train.make_train_step(logps_fn, optax.adamw(1e-3), loss="rank_dpo", reference=reference, gradient_field=True)


def test_adaptive_dpo_steps_with_ema_companions():
  """Adaptive-DPO through the train step: a frozen reference with two EMA companions (decays 0.9999
  and 0.5, warm-up 2). Three jitted steps: the first two train with u = 0 (the first at log 2, policy
  = reference), the third's loss equals the authors' formula on errors computed in numpy for the
  policy, the reference and the two EMAs (the padding pair in the batch statistics, out of the
  mean), and the EMAs follow diffusers' schedule of the policy's parameters after each step."""
  s = schedules.linear()
  logps_fn = pairs.make_logps_fn(standin.denoise, s, timestep_range=T_RANGE)
  policy = _near_identity(jax.random.key(0))
  reference = pairs.check_reference(
    pofx.references.ema_companions(pofx.references.frozen(policy, logps_fn), logps_fn, decays=(0.9999, 0.5))
  )
  opt, beta = optax.adam(1e-2), 1000.0
  step = pofx.train.make_train_step(logps_fn, opt, loss="adaptive_dpo", loss_hyper={"beta": beta}, reference=reference)
  state = pofx.train.init_state(policy, opt, reference, pofx.perturbations.none(), loss="adaptive_dpo")
  ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  copy = lambda tree: jax.tree.map(np.array, tree)  # copies: the step donates its state
  after, losses = [], []
  for i in range(3):
    before, emas = copy(state.params), [copy(e) for e in state.ref_state["emas"]]
    state, metrics = step(state, {"pairs": _batch(i)}, jax.random.key(i))
    after.append(copy(state.params))
    losses.append(float(metrics["loss"]))
    assert float(metrics["nonfinite"]) == 0.0
  assert losses[0] == pytest.approx(np.log(2.0), abs=1e-6)
  assert not np.allclose(after[-1]["w"], policy["w"])
  # The third step's loss: the authors' formula (tests/losses/test_diffusion_losses.py transcribes it)
  # on numpy errors of the step's policy ("before"), the reference and the EMAs as they were.
  b = _batch(2)
  e = dict(zip(("pol_w", "pol_l"), _np_errors(before, b, ac)))
  e.update(zip(("ref_w", "ref_l"), _np_errors(policy, b, ac)))
  for name, ema in zip(("ema1", "ema2"), emas):
    e.update(zip((f"{name}_w", f"{name}_l"), _np_errors(ema, b, ac)))
  ref_diff = e["ref_w"] - e["ref_l"]
  logits = np.stack([ref_diff - (e[f"{m}_w"] - e[f"{m}_l"]) for m in ("pol", "ema1", "ema2")])
  hat = 15.0 * logits / np.linalg.norm(logits, axis=1, keepdims=True)
  u = np.abs(np.mean(1.0 / (1.0 + np.exp(-hat)), axis=0) - 1.0) * np.minimum(np.std(hat, axis=0, ddof=1), 1.0)
  z = beta * logits[0] + u * u / beta - logits[0].mean()
  per_pair = np.logaddexp(0.0, -z) / (10.0 * u + 1.0)
  assert np.ptp(u[:3]) > 1e-3, u  # the pairs' uncertainties differ
  # rtol 1e-3: u is the spread of nearly equal normalised logits, which the float32 errors' rounding
  # (relative ~2e-6 here, on logits ~1e-4) moves by ~1e-4 relative.
  np.testing.assert_allclose(losses[2], per_pair[:3].mean(), rtol=1e-3)
  # diffusers' EMA of the parameters after steps 1-3: decay 0, then 2/11, then 3/12 (both EMAs).
  want = jax.tree.map(lambda p1, p2, p3: 0.25 * (2 / 11 * p1 + 9 / 11 * p2) + 0.75 * p3, *after)
  for ema in state.ref_state["emas"]:
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7), copy(ema), want)
  _check_companion_diagnostics(logps_fn, policy, reference, state)


def _check_companion_diagnostics(logps_fn, policy, reference, state):
  """`experiments.diffusion.companion_diagnostics` after the steps: each pair's u and weight under
  the policy and its EMAs, over consecutive batches of train.batch_size, equal the authors' formula
  on numpy errors of the three models and the reference; and their means split by the
  `label_flipped` mask."""
  import ml_collections

  from experiments import diffusion

  b0, b1 = _batch(5), _batch(6)
  data = {
    k: np.concatenate([np.asarray(getattr(b0, k)), np.asarray(getattr(b1, k))])
    for k in ("chosen", "rejected", "class_labels")
  }
  data["label_flipped"] = np.array([1, 0, 0, 1, 0, 1, 0, 0], bool)
  c = ml_collections.ConfigDict(
    {"train": {"logps": "pairs", "loss": "adaptive_dpo", "batch_size": 4, "scores": "gold"}}
  )
  key = jax.random.PRNGKey(3)
  got = diffusion.companion_diagnostics(c, {}, logps_fn, reference, state, data, key)
  ac = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
  keys = np.asarray(jax.random.split(key, 8))
  us = []
  for i in (0, 4):  # each batch of 4 on its own: the normalisation is over the batch
    bb = pairs.ImagePairs(
      chosen=data["chosen"][i : i + 4],
      rejected=data["rejected"][i : i + 4],
      class_labels=data["class_labels"][i : i + 4],
      noise_keys=keys[i : i + 4],
      pair_mask=np.ones(4, np.float32),
    )
    ref_w, ref_l = _np_errors(policy, bb, ac)
    logits = []
    for params in (state.params, *state.ref_state["emas"]):
      e_w, e_l = _np_errors(jax.tree.map(np.asarray, params), bb, ac)
      logits.append((ref_w - ref_l) - (e_w - e_l))
    hat = 15.0 * np.stack(logits) / np.linalg.norm(np.stack(logits), axis=1, keepdims=True)
    us.append(np.abs(np.mean(1 / (1 + np.exp(-hat)), 0) - 1) * np.minimum(np.std(hat, 0, ddof=1), 1.0))
  u = np.concatenate(us)
  w = 1.0 / (10.0 * u + 1.0)
  assert np.ptp(u) > 1e-3, u
  flipped = data["label_flipped"]
  want = {
    "adaptive_u_mean": u.mean(),
    "adaptive_weight_mean": w.mean(),
    "adaptive_u_flipped": u[flipped].mean(),
    "adaptive_u_unflipped": u[~flipped].mean(),
    "adaptive_weight_flipped": w[flipped].mean(),
    "adaptive_weight_unflipped": w[~flipped].mean(),
  }
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=2e-3), k
