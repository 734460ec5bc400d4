r"""Evaluation in the controlled world: gold reward, win rate, KL to the base, ranking accuracies.

Sampled metrics (held-out prompts; `evaluate_policy`):
  gold reward        mean r*(x, y) over y ~ pi(.|x) (and over y ~ pi_base for comparison);
  win rate           P(r*(x, y) > r*(x, y')) with y ~ pi, y' ~ pi_base on the same prompt, ties
                     counting half, with a 95% **Wilson score** interval (`wilson_interval`; the
                     success count is wins + ties / 2, so with ties the interval is conservative);
  KL(pi || pi_base)  Monte Carlo: mean over y ~ pi (temperature 1, full vocabulary) of
                     sum_t [log pi(y_t | x, y_<t) - log pi_base(y_t | x, y_<t)] over the
                     completion tokens (EOS included), with its standard error. Unbiased; single
                     samples can be negative;
  lengths            mean completion length in tokens (EOS included) of policy and base samples.

Pair metrics (held-out preference pairs; from `PairLogps`, all jit-friendly):
  reward accuracy       mean 1[(pi_w - ref_w) - (pi_l - ref_l) > 0]  (DPO's implicit reward
                        margin; TRL's `rewards/accuracies`);
  ranking accuracy      mean 1[pi(y_w|x) > pi(y_l|x)] with summed log-probs ("sum") or per-token
                        means ("mean"); ties count as wrong (Chen et al. 2024, arXiv:2405.19534);
  idealized ranking     the ranking of the exact optimum of the DPO/RLHF objective,
  accuracy              log pi*(y_w)/pi*(y_l) = [log pi_ref(y_w) - log pi_ref(y_l)]
                                                + (1/beta) log(p / (1 - p)),
                        with p = P(y_w > y_l) the true preference probability, compared with the
                        ground-truth ranking from p / (1 - p), both with the +-5% tie band on the
                        ratio of the authors' code (`rlhf_minimizer_client.py`:
                        `_get_ranking_from_ratio`); p is clipped to [eps, 1 - eps] (eps = 1e-3,
                        their constant). "mean" uses per-token mean reference log-probs (their
                        `normalized=True`, ppl_2 / ppl_1); `evaluate_pairs(betas=...)` also
                        reports it over a sweep of beta (`IDEALIZED_BETAS`, the authors' sweep);
  flip threshold        -log sigmoid(beta * log(pi_ref(y_l)/pi_ref(y_w))): the DPO loss a pair must
                        fall below before the policy ranks it correctly (Chen et al. 2024,
                        arXiv:2405.19534);
  ranking changed       mean 1[(pi_w > pi_l) != (ref_w > ref_l)]: pairs whose ranking training changed;
  log-ratios            mean log pi(y_w) - log ref(y_w), the same for y_l, and their difference
                        (likelihood displacement: Pal et al. 2024, arXiv:2402.13228).

Studies of the world (`experiments/study.py`):
  sharpness             the largest increase of a loss within an L2 ball of radius rho around the
                        parameters, found by projected normalised-gradient ascent (`sharpness`);
  best-of-n KL          log n - (n - 1)/n (`best_of_n_kl`);
  Gao et al. fits       gold reward against d = sqrt(KL): d (alpha - beta d) for best-of-n and
                        d (alpha - beta log d) for RL (`gao_fit`; Gao et al. 2022, arXiv:2210.10760);
  matched KL            a metric read off a training curve at given KLs, by linear interpolation
                        in KL at the first crossing (`value_at_kl`);
  pair accuracy         the share of pairs a reward difference ranks as the gold reward (or the
                        label) does (`pair_accuracy`).

Training diagnostic (`gradient_field`, logged per step by `pofx.train` with `gradient_field=True`):
  the gradient field of a loss over the chosen and rejected log-probs (Feng et al. 2024,
  arXiv:2404.04626, who study the DPO loss's gradient vector field over the two completions'
  probabilities): per pair, d_w = dl/d log pi(y_w|x), d_l = dl/d log pi(y_l|x), and the ratios of
  their magnitudes in log-prob space and in probability space
  (|dl/dpi_w| / |dl/dpi_l| = |d_w| / |d_l| * pi_l / pi_w).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from statistics import NormalDist
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pofx import options, sampling
from pofx import world as world_lib
from pofx._pair_logps import PairLogps
from pofx.losses import check_beta, check_choice

Array = jax.Array

NORMALIZATIONS = ("sum", "mean")


# Intervals and win rate ------------------------------------------------------------------------


def _z(confidence: float) -> float:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence!r}.")
  return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: float, n: int, confidence: float = 0.95):
  """Wilson score interval `(low, high)` of a binomial proportion with `successes` out of `n`
  (successes may be fractional, e.g. ties counted half):

      (p + z^2/(2n) -+ z sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n),   p = successes / n.
  """
  if n <= 0:
    raise ValueError(f"wilson_interval: n must be positive, got {n!r}.")
  if not 0 <= successes <= n:
    raise ValueError(f"wilson_interval: successes must be in [0, n={n}], got {successes!r}.")
  z = _z(confidence)
  p = successes / n
  denom = 1.0 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return max(0.0, center - half), min(1.0, center + half)


class WinRate(NamedTuple):
  """Win rate with ties counted half and its Wilson interval."""

  rate: float
  low: float
  high: float
  wins: int
  ties: int
  losses: int

  @property
  def n(self) -> int:
    return self.wins + self.ties + self.losses


def win_rate(policy_scores, base_scores, *, confidence: float = 0.95) -> WinRate:
  """Fraction of paired comparisons the policy wins (`policy_scores[i] > base_scores[i]`), ties
  counting half, with the Wilson interval at `confidence`."""
  a = np.asarray(policy_scores, np.float64).reshape(-1)
  b = np.asarray(base_scores, np.float64).reshape(-1)
  if a.shape != b.shape or a.size == 0:
    raise ValueError(f"win_rate: need two non-empty score arrays of one shape, got {a.shape} and {b.shape}.")
  wins, ties = int(np.sum(a > b)), int(np.sum(a == b))
  losses = a.size - wins - ties
  succ = wins + 0.5 * ties
  lo, hi = wilson_interval(succ, a.size, confidence)
  return WinRate(succ / a.size, lo, hi, wins, ties, losses)


def mean_and_stderr(x):
  """(mean, standard error of the mean) of a 1-D sample (stderr 0 for one value)."""
  x = np.asarray(x, np.float64).reshape(-1)
  if x.size == 0:
    raise ValueError("mean_and_stderr: empty sample.")
  se = float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
  return float(np.mean(x)), se


def kl_estimate(policy_logps, base_logps):
  """Monte Carlo KL(pi || pi_base) from samples y ~ pi: `(mean, stderr)` of
  `policy_logps - base_logps`, each the summed completion log-prob of one sample `[N]`."""
  d = np.asarray(policy_logps, np.float64).reshape(-1) - np.asarray(base_logps, np.float64).reshape(-1)
  return mean_and_stderr(d)


# Pair metrics (jit-friendly) ---------------------------------------------------------------------


def _scores(logps: PairLogps, normalize: str):
  check_choice("evaluation", "normalize", normalize, NORMALIZATIONS)
  if normalize == "sum":
    return logps.chosen, logps.rejected
  if logps.chosen_len is None or logps.rejected_len is None:
    raise ValueError("normalize='mean' needs chosen_len and rejected_len in the PairLogps.")
  return (logps.chosen / jnp.maximum(logps.chosen_len, 1.0), logps.rejected / jnp.maximum(logps.rejected_len, 1.0))


def reward_accuracy(policy: PairLogps, reference: PairLogps) -> Array:
  """Per-pair `[B]` float32 1[(pi_w - ref_w) - (pi_l - ref_l) > 0] (mean it for the accuracy)."""
  margin = (policy.chosen - reference.chosen) - (policy.rejected - reference.rejected)
  return (margin > 0).astype(jnp.float32)


def ranking_accuracy(policy: PairLogps, *, normalize: str = "sum") -> Array:
  """Per-pair `[B]` float32 1[pi(y_w|x) > pi(y_l|x)] (strict: ties are wrong), with summed
  ("sum") or per-token mean ("mean") log-probs. Chen et al. 2024, arXiv:2405.19534."""
  w, l = _scores(policy, normalize)
  return (w > l).astype(jnp.float32)


def _rank_with_band(log_ratio, tie_band):
  """+1 (first better), 0 (tie: |ratio - 1| < tie_band), -1, from a log ratio (as in the authors'
  `_get_ranking_from_ratio`, in log space: ratio >= 1 + band is +1)."""
  ratio_minus_1 = jnp.expm1(jnp.clip(log_ratio, -80.0, 80.0))
  return jnp.where(jnp.abs(ratio_minus_1) < tie_band, 0, jnp.where(ratio_minus_1 > 0, 1, -1))


def idealized_ranking_accuracy(
  reference: PairLogps, pref_prob, *, beta: float, normalize: str = "sum", tie_band: float = 0.05, eps: float = 1e-3
) -> Array:
  """Per-pair `[B]` float32: does the DPO/RLHF optimum pi* rank the pair as the truth does?

  log pi*(y_w)/pi*(y_l) = h_ref + (1/beta) log(p/(1-p)), h_ref = the reference's (summed or
  mean) log-prob difference, p = `pref_prob` [B] = P(y_w > y_l) clipped to [eps, 1-eps]. Both
  this ratio and the truth's p/(1-p) are mapped to a ranking with the +-`tie_band` band on the
  ratio; the pair counts 1 when the two rankings agree (a true tie predicted as a tie counts).
  Chen et al. 2024 (arXiv:2405.19534), code `rlhf_minimizer_client.py`.
  """
  check_beta("idealized_ranking_accuracy", beta)
  w, l = _scores(reference, normalize)
  p = jnp.clip(jnp.asarray(pref_prob, jnp.float32), eps, 1.0 - eps)
  truth_log_ratio = jnp.log(p) - jnp.log1p(-p)
  ideal = (w - l) + truth_log_ratio / beta
  return (_rank_with_band(ideal, tie_band) == _rank_with_band(truth_log_ratio, tie_band)).astype(jnp.float32)


def ranking_changed(policy: PairLogps, reference: PairLogps, *, normalize: str = "sum") -> Array:
  """Per-pair `[B]` float32: 1 where the policy ranks the pair otherwise than the reference does,
  `1[(pi_w > pi_l) != (ref_w > ref_l)]` (summed or per-token mean log-probs; a tie counts as
  "not above", as in `ranking_accuracy`). Its mean is the fraction of pairs whose ranking training
  changed, in either direction (Chen et al. 2024, arXiv:2405.19534, Sec. 4: DPO rarely flips
  rankings)."""
  pw, pl = _scores(policy, normalize)
  rw, rl = _scores(reference, normalize)
  return ((pw > pl) != (rw > rl)).astype(jnp.float32)


def flip_threshold_loss(reference: PairLogps, *, beta: float) -> Array:
  """Per-pair `[B]`: -log sigmoid(beta * (log pi_ref(y_l) - log pi_ref(y_w))), the DPO loss below
  which the policy ranks the pair correctly (pi_w > pi_l iff L_DPO < this; Chen et al. 2024,
  arXiv:2405.19534)."""
  check_beta("flip_threshold_loss", beta)
  return -jax.nn.log_sigmoid(beta * (reference.rejected - reference.chosen))


# Model-level evaluation ------------------------------------------------------------------------


def score_completions(
  params,
  prompts: Sequence,
  completions: Sequence,
  *,
  model,
  prompt_width: Optional[int] = None,
  completion_width: Optional[int] = None,
  batch_size: int = 512,
):
  """Teacher-forced per-token log-probs of given completions under `model` (its pure functions,
  e.g. `pofx.models.make(config)`) with `params`: `(token_logps [N, T], mask [N, T])` numpy
  float32, in fixed-size jitted batches (the layout of `pofx.sampling.score`)."""
  n = len(prompts)
  if n != len(completions) or n == 0:
    raise ValueError(f"score_completions: need as many prompts as completions (> 0), got {n} and {len(completions)}.")
  ptok, pmask = sampling.left_pad(prompts, length=prompt_width)
  T = completion_width or max(len(c) for c in completions)
  ctok = np.zeros((n, T), np.int32)
  cmask = np.zeros((n, T), np.float32)
  for i, c in enumerate(completions):
    c = np.asarray(c, np.int32).reshape(-1)
    if c.size == 0 or c.size > T:
      raise ValueError(f"score_completions: completion {i} has {c.size} tokens; allowed 1..{T}.")
    ctok[i, : c.size] = c
    cmask[i, : c.size] = 1.0
  bs = min(batch_size, n)
  out = []
  for start in range(0, n, bs):
    sl = slice(start, start + bs)
    parts = [ptok[sl], pmask[sl], ctok[sl], cmask[sl]]
    real = parts[0].shape[0]
    if real < bs:
      parts = [np.concatenate([x, np.repeat(x[:1], bs - real, 0)]) for x in parts]
    s = sampling.Samples(parts[0], parts[1], parts[2], parts[3], None, None, None, None)
    out.append(np.asarray(sampling.score(params, s, model=model))[:real])
  return np.concatenate(out).astype(np.float32), cmask


def pair_logps(
  params, prompts, chosen, rejected, *, model, batch_size: int = 512, prompt_width=None, completion_width=None
) -> PairLogps:
  """`PairLogps` (with per-token arrays) of preference pairs under `params` (teacher forcing)."""
  T = completion_width or max(max(len(c) for c in chosen), max(len(r) for r in rejected))
  kw = dict(model=model, batch_size=batch_size, prompt_width=prompt_width, completion_width=T)
  c_lp, c_m = score_completions(params, prompts, chosen, **kw)
  r_lp, r_m = score_completions(params, prompts, rejected, **kw)
  return PairLogps.from_tokens(jnp.asarray(c_lp), jnp.asarray(c_m), jnp.asarray(r_lp), jnp.asarray(r_m))


# The betas of the authors' idealized-ranking-accuracy tables (`pofx.options.IDEALIZED_BETAS`).
IDEALIZED_BETAS = options.IDEALIZED_BETAS


def evaluate_pairs(
  params,
  reference_params,
  prompts,
  chosen,
  rejected,
  *,
  model,
  beta: float = 0.1,
  pref_prob=None,
  betas: Sequence[float] = (),
  batch_size: int = 512,
  prompt_width=None,
  completion_width=None,
  reference_logps: Optional[PairLogps] = None,
) -> dict:
  """Pair metrics of a policy on held-out pairs: the mean chosen and rejected log-ratios
  `log pi(y) - log ref(y)` (summed log-probs) and their difference (the margin), reward accuracy
  (against `reference_params`), ranking accuracy (sum and mean) of the policy and of the
  reference, the fraction of pairs whose ranking differs from the reference's
  (`ranking_changed`), and, when `pref_prob`
  (P(chosen > rejected), e.g. `PreferenceData.label_prob`) is given, the idealized ranking
  accuracy (sum and mean) at `beta` and the mean flip-threshold loss; with `betas` (e.g.
  `IDEALIZED_BETAS`, the authors' sweep) also the idealized ranking accuracy at each of them,
  `{"idealized_ranking_accuracy_by_beta": {"<beta>": sum, ...}, "..._mean_by_beta": {...}}`
  (keys formatted `f"{beta:g}"`). Python floats.

  `reference_logps`: the reference's `pair_logps` of these pairs when already computed (e.g. one
  base for several policies); `reference_params` is then not read."""
  kw = dict(model=model, batch_size=batch_size, prompt_width=prompt_width, completion_width=completion_width)
  pol = pair_logps(params, prompts, chosen, rejected, **kw)
  ref = (
    reference_logps if reference_logps is not None else pair_logps(reference_params, prompts, chosen, rejected, **kw)
  )
  if ref.chosen.shape != pol.chosen.shape:
    raise ValueError(f"evaluate_pairs: reference_logps hold {ref.chosen.shape[0]} pairs, not {pol.chosen.shape[0]}.")
  pref = None if pref_prob is None else jnp.asarray(pref_prob, jnp.float32)
  betas = tuple(float(b) for b in betas)
  metrics = jax.device_get(_pair_metrics(pol, ref, pref, float(beta), betas))
  out = {}
  for name in _PAIR_METRICS:  # jit returns dicts in sorted key order; keep this order and the betas'
    if name in metrics:
      v = metrics[name]
      out[name] = {f"{b:g}": float(v[f"{b:g}"]) for b in betas} if isinstance(v, dict) else float(v)
  out["num_pairs"] = int(pol.chosen.shape[0])
  return out


_PAIR_METRICS = (
  "chosen_logratio",
  "rejected_logratio",
  "logratio_margin",
  "ranking_changed",
  "reward_accuracy",
  "ranking_accuracy",
  "ranking_accuracy_mean",
  "ref_ranking_accuracy",
  "ref_ranking_accuracy_mean",
  "idealized_ranking_accuracy",
  "idealized_ranking_accuracy_mean",
  "flip_threshold_loss",
  "idealized_ranking_accuracy_by_beta",
  "idealized_ranking_accuracy_mean_by_beta",
)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _pair_metrics(pol: PairLogps, ref: PairLogps, pref_prob, beta: float, betas: Tuple[float, ...]) -> dict:
  """`evaluate_pairs`' means, as one program (not one small program per operation)."""
  m = jnp.mean
  out = {
    "chosen_logratio": m(pol.chosen - ref.chosen),
    "rejected_logratio": m(pol.rejected - ref.rejected),
    "logratio_margin": m((pol.chosen - ref.chosen) - (pol.rejected - ref.rejected)),
    "ranking_changed": m(ranking_changed(pol, ref, normalize="sum")),
    "reward_accuracy": m(reward_accuracy(pol, ref)),
    "ranking_accuracy": m(ranking_accuracy(pol, normalize="sum")),
    "ranking_accuracy_mean": m(ranking_accuracy(pol, normalize="mean")),
    "ref_ranking_accuracy": m(ranking_accuracy(ref, normalize="sum")),
    "ref_ranking_accuracy_mean": m(ranking_accuracy(ref, normalize="mean")),
  }
  if pref_prob is not None:
    out["idealized_ranking_accuracy"] = m(idealized_ranking_accuracy(ref, pref_prob, beta=beta, normalize="sum"))
    out["idealized_ranking_accuracy_mean"] = m(idealized_ranking_accuracy(ref, pref_prob, beta=beta, normalize="mean"))
    out["flip_threshold_loss"] = m(flip_threshold_loss(ref, beta=beta))
    for norm, key in (
      ("sum", "idealized_ranking_accuracy_by_beta"),
      ("mean", "idealized_ranking_accuracy_mean_by_beta"),
    ):
      out[key] = {f"{b:g}": m(idealized_ranking_accuracy(ref, pref_prob, beta=b, normalize=norm)) for b in betas}
  return out


def evaluate_policy(
  world,
  params,
  base_params,
  prompts: Sequence,
  key,
  *,
  model,
  num_samples: int = 1,
  temperature=1.0,
  top_k: int = 0,
  batch_size: int = 512,
  confidence: float = 0.95,
  base_samples: Optional[sampling.Samples] = None,
) -> dict:
  """Sampled metrics of a policy against the base on held-out `prompts` (see the module docstring).

  Draws `num_samples` completions per prompt from the policy and from the base (independent
  keys from `key`), scores both with `world.gold_reward`, pairs policy sample j with base sample
  j of the same prompt for the win rate, and estimates KL(pi || pi_base) from the policy samples
  (their temperature-1 log-probs minus the base's teacher-forced ones). KL is exact MC only at
  temperature 1 without top-k; otherwise it is the KL of the model distributions evaluated on
  tempered samples. Pass `base_samples` (from a previous call's `"base_samples"`) to reuse the
  base's samples across policies (same prompts and num_samples).

  Returns a dict of Python floats: gold_reward, gold_reward_stderr, base_gold_reward,
  win_rate, win_rate_low, win_rate_high (Wilson), kl, kl_stderr, length, base_length,
  finished_fraction, num_comparisons; and "base_samples" (for reuse).
  """
  rep = [np.asarray(p, np.int32) for p in prompts for _ in range(int(num_samples))]
  k_pol, k_base = jax.random.split(key)
  kw = dict(model=model, temperature=temperature, top_k=top_k, batch_size=batch_size)
  pol = world_lib.sample_completions(world, params, rep, k_pol, **kw)
  if base_samples is None:
    base_samples = world_lib.sample_completions(world, base_params, rep, k_base, **kw)
  elif np.asarray(base_samples.tokens).shape[0] != len(rep):
    raise ValueError("evaluate_policy: base_samples do not match prompts x num_samples.")
  r_pol = world.gold_reward(rep, sampling.completions(pol))
  r_base = world.gold_reward(rep, sampling.completions(base_samples))
  wr = win_rate(r_pol, r_base, confidence=confidence)
  base_lp = _score_samples(base_params, pol, model=model, batch_size=batch_size)
  kl, kl_se = kl_estimate(np.sum(pol.logps, -1), np.sum(base_lp, -1))
  g, g_se = mean_and_stderr(r_pol)
  return {
    "gold_reward": g,
    "gold_reward_stderr": g_se,
    "base_gold_reward": float(np.mean(r_base)),
    "win_rate": wr.rate,
    "win_rate_low": wr.low,
    "win_rate_high": wr.high,
    "kl": kl,
    "kl_stderr": kl_se,
    "length": float(np.mean(pol.lengths)),
    "base_length": float(np.mean(base_samples.lengths)),
    "finished_fraction": float(np.mean(pol.finished)),
    "num_comparisons": wr.n,
    "base_samples": base_samples,
  }


def _score_samples(params, samples: sampling.Samples, *, model, batch_size: int):
  n = np.asarray(samples.tokens).shape[0]
  bs = min(batch_size, n)
  out = []
  for start in range(0, n, bs):
    part = jax.tree.map(lambda a: np.asarray(a)[start : start + bs], samples)
    real = part.tokens.shape[0]
    if real < bs:
      part = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], bs - real, 0)]), part)
    out.append(np.asarray(sampling.score(params, part, model=model))[:real])
  return np.concatenate(out)


# Gradient field of a loss over the two log-probs -------------------------------------------------


class GradientField(NamedTuple):
  """Per-pair partial derivatives of a loss with respect to the summed completion log-probs.

  d_chosen, d_rejected: `[B]` dl_i/d log pi(y_w|x), dl_i/d log pi(y_l|x).
  log_ratio: `[B]` log|d_chosen| - log|d_rejected| (log-prob space; 0 for DPO).
  log_prob_ratio: `[B]` log(|dl/dpi_w| / |dl/dpi_l|) = log_ratio + log pi(y_l|x) - log pi(y_w|x)
    (probability space, by the chain rule dl/dpi = (dl/d log pi) / pi).
  A zero derivative gives an infinite log ratio (e.g. a hinge loss past its margin).
  """

  d_chosen: Array
  d_rejected: Array
  log_ratio: Array
  log_prob_ratio: Array


def gradient_field(per_pair_loss, policy: PairLogps) -> GradientField:
  """The gradient field of `per_pair_loss(policy) -> [B]` over `policy.chosen` and `policy.rejected`.

  The derivatives are taken by autodiff with every other field of `policy` (lengths, per-token
  arrays) held fixed, of the sum over pairs: for a loss whose pairs are independent this is each
  pair's own derivative; a loss with batch statistics (beta-DPO, aot) adds its cross terms.
  For DPO, l = -log sigmoid(beta h) with h the log-ratio margin, d_w = -beta sigmoid(-beta h) =
  -d_l, so the log-prob-space ratio is 1 and the probability-space ratio is pi_l / pi_w: the
  asymmetry Feng et al. 2024 (arXiv:2404.04626) analyse (the rejected completion's probability is
  pushed down faster than the chosen one's is pushed up when pi_l < pi_w).
  """

  def total(chosen, rejected):
    return jnp.sum(per_pair_loss(dataclasses.replace(policy, chosen=chosen, rejected=rejected)))

  d_w, d_l = jax.grad(total, argnums=(0, 1))(jnp.asarray(policy.chosen), jnp.asarray(policy.rejected))
  log_ratio = jnp.log(jnp.abs(d_w)) - jnp.log(jnp.abs(d_l))
  return GradientField(d_w, d_l, log_ratio, log_ratio + policy.rejected - policy.chosen)


# Sharpness, best-of-n, over-optimisation fits ----------------------------------------------------


def sharpness(objective, params, *, rho: float, steps: int = 10, step_size: Optional[float] = None) -> dict:
  """The largest increase of `objective` found within the L2 ball of radius `rho` around `params`.

  Projected normalised-gradient ascent on the perturbation (global L2 norm over the pytree):

      delta_0 = 0,  delta_{k+1} = P_rho(delta_k + a g_k / ||g_k||),  g_k = grad objective(params + delta_k),

  with `P_rho` the projection onto `||delta|| <= rho` and `a = step_size` (default `2.5 rho /
  steps`, the PGD step of Madry et al. 2018, arXiv:1706.06083). The first step is SAM's
  perturbation (Foret et al. 2021, arXiv:2010.01412, Eq. 2), scaled by `a`. Returns Python floats:
  `sharpness = max_k objective(params + delta_k) - objective(params)` over k = 1..steps (>= 0 up
  to the first step: the maximum includes delta_0), `loss` = objective(params), and
  `delta_norm`, the norm of the maximising perturbation.

  Args:
    objective: `params -> scalar` (jax-differentiable), e.g. a held-out preference loss.
    params: the parameter pytree.
    rho: radius (> 0). steps: ascent steps (>= 1). step_size: `a` (> 0), or None.
  """
  if not (isinstance(rho, (int, float)) and rho > 0):
    raise ValueError(f"sharpness: rho must be > 0, got {rho!r}.")
  if not (isinstance(steps, int) and steps >= 1):
    raise ValueError(f"sharpness: steps must be an integer >= 1, got {steps!r}.")
  a = 2.5 * rho / steps if step_size is None else step_size
  if not a > 0:
    raise ValueError(f"sharpness: step_size must be > 0, got {step_size!r}.")
  # The parameters are an argument (not constants of the traced function): one compiled program
  # serves every parameter set of the same structure.
  vg_at = jax.jit(jax.value_and_grad(lambda d, p: objective(jax.tree.map(jnp.add, p, d))))
  vg = lambda d: vg_at(d, params)
  norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(t)))
  delta = jax.tree.map(jnp.zeros_like, params)
  loss0, g = vg(delta)
  best, best_norm = float(loss0), 0.0
  for _ in range(steps):
    gn = norm(g)
    delta = jax.tree.map(lambda d, gi: d + a * gi / jnp.maximum(gn, 1e-12), delta, g)
    dn = norm(delta)
    delta = jax.tree.map(lambda d: d * jnp.minimum(1.0, rho / jnp.maximum(dn, 1e-12)), delta)
    value, g = vg(delta)
    if float(value) > best:
      best, best_norm = float(value), float(norm(delta))
  return {"sharpness": best - float(loss0), "loss": float(loss0), "delta_norm": best_norm}


def best_of_n_kl(n) -> np.ndarray:
  """KL(best-of-n || base) = log n - (n - 1)/n, for a selection without ties (Stiennon et al. 2020,
  arXiv:2009.01325; used by Gao et al. 2022, arXiv:2210.10760, Sec. 2)."""
  n = np.asarray(n, np.float64)
  if np.any(n < 1):
    raise ValueError(f"best_of_n_kl: n must be >= 1, got {n!r}.")
  return np.log(n) - (n - 1.0) / n


GAO_FORMS = ("bon", "rl")


def gao_fit(d, gold_gain, *, form: str) -> tuple:
  """Least-squares fit of Gao et al.'s over-optimisation forms (arXiv:2210.10760, Eq. 1 and 2) to
  gold-reward gains `R` (over the initial policy) at distances `d = sqrt(KL)`:

      "bon":  R(d) = d (alpha - beta d)          "rl":  R(d) = d (alpha - beta log d)

  (R(0) = 0 by construction; points with d <= 0 are dropped). Returns `(alpha, beta)` minimising
  the squared error, linear in (alpha, beta)."""
  check_choice("gao_fit", "form", form, GAO_FORMS)
  d = np.asarray(d, np.float64).reshape(-1)
  r = np.asarray(gold_gain, np.float64).reshape(-1)
  if d.shape != r.shape:
    raise ValueError(f"gao_fit: d and gold_gain differ in shape, {d.shape} and {r.shape}.")
  keep = d > 0
  d, r = d[keep], r[keep]
  if d.size < 2:
    raise ValueError(f"gao_fit: need at least 2 points with d > 0, got {d.size}.")
  second = d * d if form == "bon" else d * np.log(d)
  (alpha, beta), *_ = np.linalg.lstsq(np.stack([d, -second], 1), r, rcond=None)
  return float(alpha), float(beta)


def gao_curve(d, alpha: float, beta: float, *, form: str) -> np.ndarray:
  """`d (alpha - beta d)` ("bon") or `d (alpha - beta log d)` ("rl"), 0 at d = 0."""
  check_choice("gao_curve", "form", form, GAO_FORMS)
  d = np.asarray(d, np.float64)
  safe = np.where(d > 0, d, 1.0)
  second = d * d if form == "bon" else np.where(d > 0, d * np.log(safe), 0.0)
  return alpha * d - beta * second


def value_at_kl(kl, values, targets) -> np.ndarray:
  """A metric at matched KL: the piecewise-linear curve through the points `(kl[i], values[i])`
  taken in the given (training) order, read at each KL in `targets` where it first reaches it
  (the first segment `kl[i] -> kl[i+1]` that contains the target, linear in KL there; a point
  exactly at the target gives its own value). NaN for a target the curve never reaches. Curves of
  training need not be monotone in KL, hence "first". Returns `[len(targets)]` float64."""
  k = np.asarray(kl, np.float64).reshape(-1)
  v = np.asarray(values, np.float64).reshape(-1)
  if k.shape != v.shape or k.size == 0:
    raise ValueError(f"value_at_kl: need kl and values of one non-empty shape, got {k.shape} and {v.shape}.")
  out = []
  for t in np.asarray(targets, np.float64).reshape(-1):
    found = float("nan")
    if k[0] == t:
      found = float(v[0])
    for i in range(k.size - 1):
      if not math.isnan(found):
        break
      a, b = k[i], k[i + 1]
      if b == t:
        found = float(v[i + 1])
      elif min(a, b) <= t <= max(a, b) and a != b:
        found = float(v[i] + (t - a) / (b - a) * (v[i + 1] - v[i]))
    out.append(found)
  return np.asarray(out, np.float64)


def pair_accuracy(margin, truth) -> float:
  """The share of pairs ranked as `truth` ranks them: `mean(sign(margin) == sign(truth))` over the
  pairs with `truth != 0` (a gold tie says nothing); a zero margin counts as wrong. `margin`: a
  reward difference `r(y_1) - r(y_2)` (implicit or a reward model's); `truth`: the gold difference
  or the label (+1 when y_1 was preferred). NaN when every `truth` is 0."""
  m = np.asarray(margin, np.float64).reshape(-1)
  t = np.asarray(truth, np.float64).reshape(-1)
  if m.shape != t.shape:
    raise ValueError(f"pair_accuracy: margin and truth differ in shape, {m.shape} and {t.shape}.")
  keep = t != 0
  if not keep.any():
    return float("nan")
  return float(np.mean(np.sign(m[keep]) == np.sign(t[keep])))
