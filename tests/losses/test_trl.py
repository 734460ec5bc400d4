"""Tests of pofx/losses/_trl.py and the `pofx.losses.trl` namespace: TRL 1.16's loss types,
modifiers, LD-DPO, WPO, f-DPO, trl_dpo_loss, and the map from TRL's names to the canonical ones.

Expected values come from (a) the worked example below, each value derived by hand in plain-Python
float64 from the loss's formula (the paper's equation, as TRL 1.16 writes it), and (b) float64
numpy formulas written out here from TRL 1.16's `DPOTrainer._compute_loss`. TRL's own code is run
in test_trl_parity.py.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pofx
from pofx.losses import _trl

# ----------------------------------------------------------------------------------------------
# The worked example: pi_w=-10, pi_l=-12, ref_w=ref_l=-11, beta=0.1, |y_w|=5, |y_l|=6,
# uniform tokens (chosen: 5 x -2 policy, 5 x -11/5 reference; rejected: 6 x -2, 6 x -11/6).
# ----------------------------------------------------------------------------------------------


def _uniform(values_and_lengths, width=7):
  tok = np.zeros((1, width), np.float32)
  mask = np.zeros((1, width), np.float32)
  value, n = values_and_lengths
  tok[0, :n] = value
  mask[0, :n] = 1.0
  return tok, mask


def example_pair():
  c_tok, c_mask = _uniform((-2.0, 5))
  r_tok, r_mask = _uniform((-2.0, 6))
  rc_tok, _ = _uniform((-11.0 / 5, 5))
  rr_tok, _ = _uniform((-11.0 / 6, 6))
  policy = pofx.PairLogps.from_tokens(c_tok, c_mask, r_tok, r_mask)
  reference = pofx.PairLogps.from_tokens(rc_tok, c_mask, rr_tok, r_mask)
  return policy, reference


EX_POLICY, EX_REFERENCE = example_pair()

# Hand-derived values at the worked example (lr_w = +1, lr_l = -1, beta = 0.1, so beta * rho = 0.2),
# each from TRL 1.16's formula as written in DPOTrainer._compute_loss. Where an older TRL differs
# (sigmoid with label smoothing, bco_pair with a running-mean shift, forward-KL f'(u) = -1/u vs
# 1.16's 1 - 1/u), the 1.16 form gives the same number here (no smoothing / zero shift / the
# constant cancels in s_w - s_l). TRL names are written "trl.<loss_type>", as pofx.losses.get reads them.
GOLDEN = [
  ("trl.sigmoid", {}, 0.598139),  # log(1 + e^{-0.2})
  ("trl.hinge", {}, 0.800000),  # 1 - 0.2
  ("trl.ipo", {}, 21.467778),  # d = 1/5 + 1/6, (d - 5)^2
  ("trl.exo_pair", {"label_smoothing": 1e-3}, 2.422015),
  ("trl.nca_pair", {}, 1.338793),
  ("trl.robust", {"label_smoothing": 0.1}, 0.573139),
  ("trl.bco_pair", {}, 1.288793),  # 2 log(1 + e^{-0.1})
  ("trl.sppo_hard", {}, 32.000000),  # (1 - 5)^2 + (-1 + 5)^2
  ("trl.aot", {}, 0.598139),  # B = 1: sorting is the identity, = DPO
  ("trl.aot_unpaired", {}, 0.598139),
  ("trl.apo_zero", {}, 0.950042),  # (1 - sigmoid(0.1)) + sigmoid(-0.1)
  ("trl.apo_down", {}, 0.975145),  # sigmoid(0.1) + 1 - sigmoid(0.2)
  ("trl.discopop", {}, 0.814763),  # tau = 0.05
  ("trl.sigmoid_norm", {}, 0.674982),  # -log sigmoid(0.1 (1/5 + 1/6))
  # f-DPO (Wang et al. 2023, arXiv:2309.16240, Table 1); the alpha row is alpha_paper = 0.5 = TRL's coef 0.5.
  ("trl.sigmoid", {"f_divergence_type": "forward_kl"}, 0.582517),
  ("trl.sigmoid", {"f_divergence_type": "js_divergence"}, 0.644397),
  ("trl.sigmoid", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}, 0.594349),
  # LD-DPO at ld_alpha = 0.5, uniform tokens: shared length 5, the rejected's 6th token counts half:
  # policy -10 - 1 = -11, reference -55/6 - 11/12 = -121/12, so lr_l = -11/12 and rho = 23/12 = 1.916667.
  ("trl.sigmoid", {"ld_alpha": 0.5}, 0.601899),
  ("ld_dpo", {"ld_alpha": 0.5}, 0.601899),
  ("f_dpo", {"f_divergence_type": "forward_kl"}, 0.582517),
  ("f_dpo", {"f_divergence_type": "js_divergence"}, 0.644397),
  ("f_dpo", {"f_divergence_type": "alpha_divergence", "alpha": 0.5}, 0.594349),
]


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,hyper,expected", GOLDEN, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(GOLDEN)])
def test_golden_worked_example(name, hyper, expected):
  per_pair = pofx.losses.get(name)(EX_POLICY, EX_REFERENCE, **hyper)
  chex.assert_shape(per_pair, (1,))
  _close(per_pair[0], expected)


def test_golden_sft_token_mean():
  # TRL's sft: token-mean NLL of the chosen completion, 10 / 5.
  _close(pofx.losses.batch_loss("sft", EX_POLICY), 2.0)
  _close(pofx.losses.get("sft")(EX_POLICY, None)[0], 10.0)


def test_golden_combination_irpo_style():
  # IRPO-style DPO + 1.0 * token-mean NLL = 0.598139 + 2 (TRL's ["sigmoid", "sft"] with weights [1, 1]).
  _close(_trl.trl_dpo_loss(EX_POLICY, EX_REFERENCE, loss_type=["sigmoid", "sft"]), 2.598139)


def test_golden_wpo_hand_derived():
  # Hand derivation: with log sum_v p_v^2 = log p_t - 0.5 on every token the
  # per-sequence weight is e^{0.5}, the pair weight e^{1}, so WPO = e * 0.598139... .
  c_tok, c_mask = _uniform((-2.0, 5))
  r_tok, r_mask = _uniform((-2.0, 6))
  policy = pofx.PairLogps.from_tokens(
    c_tok, c_mask, r_tok, r_mask, chosen_log_sum_sq_probs=c_tok - 0.5, rejected_log_sum_sq_probs=r_tok - 0.5
  )
  dpo = math.log1p(math.exp(-0.2))
  _close(pofx.losses.get("wpo")(policy, EX_REFERENCE)[0], math.e * dpo)


# ----------------------------------------------------------------------------------------------
# float64 numpy formulas (from TRL 1.16's _compute_loss) on random batches with unequal lengths.
# ----------------------------------------------------------------------------------------------

B, T = 6, 9
C_LENS = np.array([9, 1, 4, 6, 2, 5])
R_LENS = np.array([3, 7, 4, 1, 8, 5])


def _mask(lens):
  return (np.arange(T)[None, :] < lens[:, None]).astype(np.float32)


def random_batch(seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda: (-rng.uniform(0.05, 3.0, (B, T))).astype(np.float32)
  c, r, rc, rr = draw(), draw(), draw(), draw()
  c_sq = (c - rng.uniform(0.05, 2.0, (B, T))).astype(np.float32)
  r_sq = (r - rng.uniform(0.05, 2.0, (B, T))).astype(np.float32)
  cm, rm = _mask(C_LENS), _mask(R_LENS)
  # Garbage on padding: pofx must ignore it.
  c_pad, r_pad = np.where(cm > 0, c, np.nan), np.where(rm > 0, r, -np.inf)
  policy = pofx.PairLogps.from_tokens(
    c_pad, cm, r_pad, rm, chosen_log_sum_sq_probs=c_sq, rejected_log_sum_sq_probs=r_sq
  )
  reference = pofx.PairLogps.from_tokens(rc, cm, rr, rm)
  raw = dict(
    c=c.astype(np.float64) * cm,
    r=r.astype(np.float64) * rm,
    rc=rc.astype(np.float64) * cm,
    rr=rr.astype(np.float64) * rm,
    c_sq=c_sq.astype(np.float64),
    r_sq=r_sq.astype(np.float64),
    cm=cm,
    rm=rm,
  )
  return policy, reference, raw


POLICY, REFERENCE, RAW = random_batch()


def np_logsig(x):
  return -np.logaddexp(0.0, -x)


def np_sig(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_seq(tok, mask, shared, ld_alpha):
  if ld_alpha is None:
    return (tok * mask).sum(1)
  pos = np.cumsum(mask, 1)
  return (tok * mask * (pos <= shared[:, None])).sum(1) + ld_alpha * (tok * mask * (pos > shared[:, None])).sum(1)


def np_link(lr, f, coef):
  if f == "reverse_kl":
    return lr
  if f == "forward_kl":
    return 1.0 - np.exp(-lr)
  if f == "js_divergence":
    return math.log(2.0) + np_logsig(lr)
  if abs(coef - 1.0) < 1e-6:
    return lr
  return (np.exp((coef - 1.0) * lr) - 1.0) / (coef - 1.0)


def np_loss(loss_type, raw, beta=0.1, f="reverse_kl", coef=0.5, ld_alpha=None, eps=0.0, use_weighting=False, tau=0.05):
  """Per-pair losses (and, for sft, the batch value) written from TRL 1.16's _compute_loss."""
  cm, rm = raw["cm"], raw["rm"]
  len_w, len_l = np.maximum(cm.sum(1), 1.0), np.maximum(rm.sum(1), 1.0)
  shared = np.minimum(cm.sum(1), rm.sum(1))
  pw, pl = np_seq(raw["c"], cm, shared, ld_alpha), np_seq(raw["r"], rm, shared, ld_alpha)
  rw, rl = np_seq(raw["rc"], cm, shared, ld_alpha), np_seq(raw["rr"], rm, shared, ld_alpha)
  lw, ll = pw - rw, pl - rl
  sw, sl = np_link(lw, f, coef), np_link(ll, f, coef)
  z = beta * (sw - sl)
  out = {
    "sigmoid": lambda: -np_logsig(z),
    "hinge": lambda: np.maximum(0.0, 1.0 - z),
    "ipo": lambda: (sw / len_w - sl / len_l - 1.0 / (2.0 * beta)) ** 2,
    "exo_pair": lambda: np_sig(z) * (np_logsig(z) - np.log1p(-eps)) + np_sig(-z) * (np_logsig(-z) - np.log(eps)),
    "nca_pair": lambda: -np_logsig(beta * lw) - 0.5 * np_logsig(-beta * lw) - 0.5 * np_logsig(-beta * ll),
    "robust": lambda: (-(1 - eps) * np_logsig(z) + eps * np_logsig(-z)) / (1 - 2 * eps),
    "bco_pair": lambda: -np_logsig(beta * lw) - np_logsig(-beta * ll),
    "sppo_hard": lambda: (lw - 0.5 / beta) ** 2 + (ll + 0.5 / beta) ** 2,
    "aot": lambda: _np_cdpo(beta * (np.sort(pw - pl) - np.sort(rw - rl)), eps),
    "aot_unpaired": lambda: _np_cdpo(beta * (np.sort(lw) - np.sort(ll)), eps),
    "apo_zero": lambda: (1 - np_sig(beta * lw)) + np_sig(beta * ll),
    "apo_down": lambda: np_sig(beta * lw) + (1 - np_sig(beta * (lw - ll))),
    "discopop": lambda: -np_logsig(z) * (1 - np_sig(z / tau)) + np.exp(-z) * np_sig(z / tau),
    "sigmoid_norm": lambda: -np_logsig(beta * (sw / len_w - sl / len_l)),
    "sft": lambda: np.full(B, -(raw["c"] * cm).sum() / cm.sum()),
  }[loss_type]()
  if use_weighting:
    weight = lambda tok, sq, m: np.exp(((tok - sq) * m).sum(1) / np.maximum(m.sum(1), 1.0))
    out = out * weight(raw["c"], raw["c_sq"], cm) * weight(raw["r"], raw["r_sq"], rm)
  return out


def _np_cdpo(x, eps):
  return -(1 - eps) * np_logsig(x) - eps * np_logsig(-x)


def _pofx_kwargs(loss_type, cfg):
  """Our names for the numpy config, restricted to what the function takes."""
  names = dict(
    beta="beta",
    f="f_divergence_type",
    coef="f_alpha_divergence_coef",
    ld_alpha="ld_alpha",
    eps="label_smoothing",
    use_weighting="use_weighting",
    tau="discopop_tau",
  )
  accepted = pofx.losses.trl.spec(loss_type).hyperparameters
  kw = {names[k]: v for k, v in cfg.items()}
  assert set(kw) <= set(accepted), (loss_type, kw)
  return kw


def _configs(loss_type):
  eps = {"exo_pair": 0.05, "robust": 0.2, "aot": 0.15, "aot_unpaired": 0.3}.get(loss_type)
  base = {} if eps is None else {"eps": eps}
  cfgs = [base, {**base, "beta": 0.7}, {**base, "ld_alpha": 0.35}, {**base, "ld_alpha": 0.0}]
  if loss_type not in ("aot", "aot_unpaired"):
    cfgs.append({**base, "use_weighting": True, "ld_alpha": 0.6})
  if loss_type in _trl.F_DIVERGENCE_LOSS_TYPES:
    cfgs += [
      {**base, "f": "forward_kl"},
      {**base, "f": "js_divergence"},
      {**base, "f": "alpha_divergence", "coef": 0.3},
      {**base, "f": "alpha_divergence", "coef": 1.8, "use_weighting": True},
    ]
  if loss_type == "discopop":
    cfgs += [{"tau": 0.5}, {"tau": 3.0}]
  return cfgs


NUMPY_CASES = [(t, cfg) for t in _trl.TRL_LOSS_TYPES if t != "sft" for cfg in _configs(t)]


@pytest.mark.parametrize("loss_type,cfg", NUMPY_CASES, ids=[f"{t}-{i}" for i, (t, _) in enumerate(NUMPY_CASES)])
def test_numpy_formula_random_batch(loss_type, cfg):
  expected = np_loss(loss_type, RAW, **cfg)
  got = pofx.losses.trl.get(loss_type)(POLICY, REFERENCE, **_pofx_kwargs(loss_type, cfg))
  chex.assert_shape(got, (B,))
  # ipo / sppo_hard square a difference of float32 numbers of size 1/(2 beta) = 5 (and up to 50):
  # float32 rounding of ~5 (6e-7) enters the value times 2|d - 5|, hence a larger absolute tolerance.
  atol = 1e-5 if loss_type in ("ipo", "sppo_hard") else 1e-6
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=2e-6, atol=atol)


def test_numpy_sft_batch_value():
  _close(pofx.losses.trl.batch_loss("sft", POLICY), np_loss("sft", RAW)[0])


@pytest.mark.parametrize(
  "loss_type,weights,cfg",
  [
    (["sigmoid", "sft"], [1.0, 0.5], {}),
    (["sigmoid", "bco_pair", "sft"], None, {"ld_alpha": 0.5}),
    (["robust", "exo_pair", "ipo"], [0.2, 0.3, 0.5], {"eps": 0.1, "f": "js_divergence", "use_weighting": True}),
    (["aot", "apo_down"], [2.0, -1.0], {"eps": 0.2, "beta": 0.3}),
  ],
)
def test_numpy_trl_dpo_loss(loss_type, weights, cfg):
  w = [1.0] * len(loss_type) if weights is None else weights
  expected = sum(wk * np_loss(t, RAW, **cfg).mean() for t, wk in zip(loss_type, w))
  names = dict(
    beta="beta",
    f="f_divergence_type",
    coef="f_alpha_divergence_coef",
    ld_alpha="ld_alpha",
    eps="label_smoothing",
    use_weighting="use_weighting",
    tau="discopop_tau",
  )
  got = _trl.trl_dpo_loss(
    POLICY, REFERENCE, loss_type=loss_type, loss_weights=weights, **{names[k]: v for k, v in cfg.items()}
  )
  chex.assert_shape(got, ())
  np.testing.assert_allclose(float(got), expected, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", _trl.TRL_LOSS_TYPES)
def test_trl_dpo_loss_single_equals_batch_loss(loss_type):
  kw = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust") else {}
  ref = None if loss_type == "sft" else REFERENCE
  np.testing.assert_allclose(
    float(_trl.trl_dpo_loss(POLICY, REFERENCE, loss_type=loss_type, **kw)),
    float(pofx.losses.trl.batch_loss(loss_type, POLICY, ref, **kw)),
    rtol=1e-6,
    atol=1e-7,
  )


# ----------------------------------------------------------------------------------------------
# Reduces-to identities.
# ----------------------------------------------------------------------------------------------


def _same(a, b, tol=1e-6):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_sigmoid_defaults_is_dpo_and_hinge_is_slic():
  _same(_trl.trl_sigmoid(POLICY, REFERENCE, beta=0.3), pofx.losses.dpo(POLICY, REFERENCE, beta=0.3))
  _same(_trl.trl_hinge(POLICY, REFERENCE, beta=0.3), pofx.losses.slic(POLICY, REFERENCE, beta=0.3))


def test_ipo_is_length_normalised_ipo():
  _same(_trl.trl_ipo(POLICY, REFERENCE, beta=0.2), pofx.losses.ipo(POLICY, REFERENCE, beta=0.2))


def test_f_dpo_reverse_kl_is_dpo():
  _same(pofx.losses.get("f_dpo")(POLICY, REFERENCE, f_divergence_type="reverse_kl"), pofx.losses.dpo(POLICY, REFERENCE))


def test_alpha_divergence_limits():
  dpo = pofx.losses.dpo(POLICY, REFERENCE)
  # TRL's coefficient 1 is reverse KL (its limit case); close to 1 it converges to it.
  _same(_trl.trl_sigmoid(POLICY, REFERENCE, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), dpo)
  _same(
    _trl.trl_sigmoid(POLICY, REFERENCE, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0 - 1e-3),
    dpo,
    tol=1e-3,
  )
  # TRL's coefficient 0 is forward KL: (e^{-lr} - 1)/(-1) = 1 - e^{-lr}.
  _same(
    _trl.trl_sigmoid(POLICY, REFERENCE, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.0),
    _trl.trl_sigmoid(POLICY, REFERENCE, f_divergence_type="forward_kl"),
  )
  # The paper's alpha = 1 - TRL's coefficient: f_dpo(alpha=0.2) == TRL coef 0.8; alpha = 0 is DPO.
  f_dpo = pofx.losses.get("f_dpo")
  _same(
    f_dpo(POLICY, REFERENCE, f_divergence_type="alpha_divergence", alpha=0.2),
    _trl.trl_sigmoid(POLICY, REFERENCE, f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.8),
  )
  _same(f_dpo(POLICY, REFERENCE, f_divergence_type="alpha_divergence", alpha=0.0), dpo)
  _same(
    f_dpo(POLICY, REFERENCE, f_divergence_type="alpha_divergence", alpha=1.0),
    f_dpo(POLICY, REFERENCE, f_divergence_type="forward_kl"),
  )


def test_paper_alpha_divergence_form():
  # f-DPO paper form: f'(u) = (1 - u^{-alpha})/alpha; logit beta*(f'(u_w) - f'(u_l)).
  a = 0.3
  lw, ll = (RAW["c"] - RAW["rc"]).sum(1), (RAW["r"] - RAW["rr"]).sum(1)
  fp = lambda lr: (1.0 - np.exp(-a * lr)) / a
  expected = -np_logsig(0.1 * (fp(lw) - fp(ll)))
  _same(pofx.losses.get("f_dpo")(POLICY, REFERENCE, f_divergence_type="alpha_divergence", alpha=a), expected, tol=2e-6)


def test_ld_alpha_one_is_no_ld_and_zero_truncates():
  for name in ("sigmoid", "ipo", "nca_pair", "aot"):
    fn = pofx.losses.trl.get(name)
    _same(fn(POLICY, REFERENCE, ld_alpha=1.0), fn(POLICY, REFERENCE))
  _same(pofx.losses.get("ld_dpo")(POLICY, REFERENCE, ld_alpha=1.0), pofx.losses.dpo(POLICY, REFERENCE))
  # ld_alpha = 0: DPO on both completions truncated to the shared length.
  shared = np.minimum(C_LENS, R_LENS)
  trunc = lambda tok: np.where(np.arange(T)[None, :] < shared[:, None], tok, 0.0).sum(1)
  rho = (trunc(RAW["c"]) - trunc(RAW["rc"])) - (trunc(RAW["r"]) - trunc(RAW["rr"]))
  _same(pofx.losses.get("ld_dpo")(POLICY, REFERENCE, ld_alpha=0.0), -np_logsig(0.1 * rho), tol=2e-6)


def test_ld_applies_to_the_reference_too():
  # With the same per-token values for policy and reference, every log-ratio is 0 whatever ld_alpha is.
  out = pofx.losses.get("ld_dpo")(POLICY, POLICY, ld_alpha=0.3)
  _same(out, np.full(B, math.log(2.0)))


def test_robust_eps0_is_sigmoid_and_exo_matches_kl():
  _same(_trl.trl_robust(POLICY, REFERENCE, label_smoothing=0.0), _trl.trl_sigmoid(POLICY, REFERENCE))
  # aot with eps: cDPO on sorted differences; with B=1 aot == cDPO, at eps=0.1:
  # 0.9 log(1 + e^{-0.2}) + 0.1 log(1 + e^{0.2}) = 0.618139.
  _close(_trl.trl_aot(EX_POLICY, EX_REFERENCE, label_smoothing=0.1)[0], 0.618139)
  _close(_trl.trl_aot_unpaired(EX_POLICY, EX_REFERENCE, label_smoothing=0.1)[0], 0.618139)


def test_aot_is_batch_sorted_and_permutation_invariant():
  perm = np.array([3, 0, 5, 1, 4, 2])
  take = lambda p: jax.tree.map(lambda x: x[perm], p)
  for name in ("aot", "aot_unpaired"):
    fn = pofx.losses.get(name)
    _same(fn(take(POLICY), take(REFERENCE)), fn(POLICY, REFERENCE))


def test_discopop_small_tau_switches_between_logistic_and_exponential():
  z = 0.1 * ((RAW["c"] - RAW["rc"]).sum(1) - (RAW["r"] - RAW["rr"]).sum(1))
  assert np.all(np.abs(z) > 0.01)
  expected = np.where(z > 0, np.exp(-z), -np_logsig(z))
  _same(_trl.trl_discopop(POLICY, REFERENCE, discopop_tau=1e-4), expected, tol=2e-6)


def test_wpo_unit_weights_is_dpo_and_weights_are_detached():
  c, r = POLICY.chosen_token_logps, POLICY.rejected_token_logps
  unit = POLICY.replace(chosen_log_sum_sq_probs=c, rejected_log_sum_sq_probs=r)  # log p_t = log sum p^2: w = 1
  _same(pofx.losses.get("wpo")(unit, REFERENCE), pofx.losses.dpo(unit, REFERENCE))
  # The per-token arrays feed only the (detached) weights: no gradient flows into them.
  grads = jax.grad(lambda p: jnp.sum(pofx.losses.get("wpo")(p, REFERENCE)))(POLICY)
  np.testing.assert_array_equal(np.asarray(grads.chosen_token_logps), 0.0)
  np.testing.assert_array_equal(np.asarray(grads.rejected_token_logps), 0.0)
  w_w, w_l = _trl.wpo_sequence_weights(POLICY)
  dpo_grad = jax.grad(lambda p: jnp.sum(pofx.losses.dpo(p, REFERENCE)))(POLICY)
  _same(grads.chosen, np.asarray(dpo_grad.chosen) * np.asarray(w_w * w_l))


def test_use_weighting_equals_weights_times_loss():
  w_w, w_l = _trl.wpo_sequence_weights(POLICY)
  for name in ("hinge", "apo_zero", "sppo_hard"):
    fn = pofx.losses.trl.get(name)
    _same(fn(POLICY, REFERENCE, use_weighting=True), np.asarray(fn(POLICY, REFERENCE)) * np.asarray(w_w * w_l))


def test_combination_is_weighted_sum():
  parts = [
    pofx.losses.trl.batch_loss(t, POLICY, None if t == "sft" else REFERENCE) for t in ("sigmoid", "bco_pair", "sft")
  ]
  mpo = _trl.trl_dpo_loss(POLICY, REFERENCE, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0])
  _same(mpo, 0.8 * parts[0] + 0.2 * parts[1] + 1.0 * parts[2])


# ----------------------------------------------------------------------------------------------
# Invalid hyperparameters.
# ----------------------------------------------------------------------------------------------

BAD = [
  ("trl.sigmoid", {"f_divergence_type": "kl"}, "f_divergence_type"),
  ("f_dpo", {"f_divergence_type": "hellinger"}, "f_divergence_type"),
  ("f_dpo", {"f_divergence_type": "alpha_divergence", "alpha": 1.5}, "alpha"),
  (
    "trl.sigmoid",
    {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": float("nan")},
    "f_alpha_divergence_coef",
  ),
  ("trl.robust", {"label_smoothing": 0.5}, "label_smoothing"),
  ("trl.robust", {"label_smoothing": -0.1}, "label_smoothing"),
  ("exo_pair", {"label_smoothing": 0.0}, "label_smoothing"),
  ("exo_pair", {"label_smoothing": 1.0}, "label_smoothing"),
  ("aot", {"label_smoothing": 0.6}, "label_smoothing"),
  ("aot_unpaired", {"label_smoothing": -0.2}, "label_smoothing"),
  ("trl.sigmoid", {"ld_alpha": -0.1}, "ld_alpha"),
  ("ld_dpo", {"ld_alpha": 1.5}, "ld_alpha"),
  ("ld_dpo", {"ld_alpha": None}, "ld_alpha"),
  ("discopop", {"discopop_tau": 0.0}, "discopop_tau"),
  ("trl.sigmoid", {"beta": 0.0}, "beta"),
  ("sppo_hard", {"beta": -1.0}, "beta"),
  ("trl.nca_pair", {"f_divergence_type": "js_divergence"}, "invalid f_divergence_type"),  # TRL refuses f-div here
  ("trl.aot", {"use_weighting": True}, "invalid use_weighting"),  # TRL refuses WPO with aot
  ("aot", {"use_weighting": True}, "unknown argument"),  # the canonical aot takes its own fields only
  ("dpo", {"ld_alpha": 0.5}, "unknown argument"),  # modifiers: ld_dpo, wpo, f_dpo
]


@pytest.mark.parametrize("name,hyper,match", BAD, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD)])
def test_invalid_hyperparameters_raise(name, hyper, match):
  with pytest.raises(ValueError, match=match):
    pofx.losses.batch_loss(name, POLICY, REFERENCE, **hyper)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(loss_type="dpo"), "loss_type"),
    (dict(loss_type=[]), "loss_type"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights"),
    (dict(loss_type=["sigmoid", "nca_pair"], f_divergence_type="forward_kl"), "f_divergence_type"),
    (dict(loss_type="aot", use_weighting=True), "use_weighting"),
    (dict(loss_type=["sigmoid", "aot_unpaired"], use_weighting=True), "use_weighting"),
    (dict(loss_type=["sigmoid", "sft"], use_weighting=True), "use_weighting"),
    (dict(loss_type="exo_pair"), "label_smoothing"),  # TRL's default 0.0 is refused for EXO
    (dict(loss_type="robust", label_smoothing=0.7), "label_smoothing"),
    (dict(loss_type="sigmoid", ld_alpha=2.0), "ld_alpha"),
    (dict(loss_type="sigmoid", f_divergence_type="tv"), "f_divergence_type"),
  ],
)
def test_trl_dpo_loss_invalid(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _trl.trl_dpo_loss(POLICY, REFERENCE, **kwargs)


def test_missing_inputs_raise():
  sums_only = pofx.PairLogps(
    chosen=POLICY.chosen, rejected=POLICY.rejected, chosen_len=POLICY.chosen_len, rejected_len=POLICY.rejected_len
  )
  with pytest.raises(ValueError, match="per-token"):
    pofx.losses.get("ld_dpo")(sums_only, REFERENCE, ld_alpha=0.5)
  # A sums-only reference is taken as already LD-weighted (TRL's precomputed reference; its values
  # against TRL: test_trl_parity.py::test_ld_alpha_with_a_precomputed_sums_only_reference).
  ld_sums = pofx.losses.ld_weighted_sums(REFERENCE, 0.5)
  _same(
    pofx.losses.get("ld_dpo")(POLICY, ld_sums, ld_alpha=0.5), pofx.losses.get("ld_dpo")(POLICY, REFERENCE, ld_alpha=0.5)
  )
  plain_sums = pofx.PairLogps(chosen=REFERENCE.chosen, rejected=REFERENCE.rejected)
  assert not np.allclose(  # plain sums are not LD-weighted ones: the caller must give the right ones
    pofx.losses.get("ld_dpo")(POLICY, plain_sums, ld_alpha=0.5),
    pofx.losses.get("ld_dpo")(POLICY, REFERENCE, ld_alpha=0.5),
  )
  with pytest.raises(ValueError, match="log_sum_sq_probs"):
    pofx.losses.get("wpo")(POLICY.replace(chosen_log_sum_sq_probs=None, rejected_log_sum_sq_probs=None), REFERENCE)
  with pytest.raises(ValueError, match="reference"):
    pofx.losses.trl.get("sigmoid")(POLICY, None)
  for ipo in (pofx.losses.trl.get("ipo"), pofx.losses.get("ipo")):
    with pytest.raises(ValueError, match="length"):
      ipo(sums_only.replace(chosen_len=None, rejected_len=None), REFERENCE)


# ----------------------------------------------------------------------------------------------
# Numerics and jit beyond the registry contract (non-default modifiers).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "cfg",
  [
    dict(loss_type="sigmoid", f_divergence_type="forward_kl"),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.2),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.7),
    dict(loss_type="discopop", discopop_tau=2.0),
    dict(loss_type="exo_pair", label_smoothing=1e-3, f_divergence_type="js_divergence"),
    dict(loss_type=["ipo", "sigmoid_norm", "sft"], ld_alpha=0.3),
  ],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_at_extreme_margins_with_modifiers(cfg, sign):
  big = 1e4 * sign
  policy = POLICY.replace(
    chosen=POLICY.chosen + big,
    rejected=POLICY.rejected - big,
    chosen_token_logps=POLICY.chosen_token_logps.at[:, 0].add(big),
    rejected_token_logps=POLICY.rejected_token_logps.at[:, 0].add(-big),
  )
  value, grads = jax.value_and_grad(lambda p: _trl.trl_dpo_loss(p, REFERENCE, **cfg))(policy)
  assert np.isfinite(float(value))
  chex.assert_tree_all_finite(grads)


def test_trl_dpo_loss_jits():
  fn = jax.jit(lambda p, r: _trl.trl_dpo_loss(p, r, loss_type=["sigmoid", "bco_pair", "sft"], ld_alpha=0.5))
  eager = _trl.trl_dpo_loss(POLICY, REFERENCE, loss_type=["sigmoid", "bco_pair", "sft"], ld_alpha=0.5)
  np.testing.assert_allclose(float(fn(POLICY, REFERENCE)), float(eager), rtol=1e-6)


def test_registered_names_and_metadata():
  for loss_type in _trl.TRL_LOSS_TYPES:
    spec = pofx.losses.trl.spec(loss_type)
    assert spec.family == "trl" and spec.name == f"trl.{loss_type}"
    assert pofx.losses.spec(spec.name) is spec  # the qualified name round-trips
  for name in ("ld_dpo", "wpo", "f_dpo"):
    assert pofx.losses.spec(name).family == "trl"
  for name in (pofx.losses.spec("sft"), pofx.losses.trl.spec("sft")):
    assert name.reduction == "chosen_token_mean" and name.reference == "unused"
  assert {"tokens", "log_sum_sq_probs"} <= pofx.losses.spec("wpo").requires
  assert "tokens" in pofx.losses.spec("ld_dpo").requires


# ----------------------------------------------------------------------------------------------
# The compatibility namespace: TRL's names -> canonical names.
# ----------------------------------------------------------------------------------------------

# TRL loss_type -> (canonical name, the canonical hyperparameters that give TRL's defaults). The
# table of the `pofx.losses` docstring; each row is a formula identity checked on the random batch.
TRL_TO_CANONICAL = {
  "sigmoid": ("dpo", {}),
  "hinge": ("slic", {}),
  "ipo": ("ipo", {}),
  "exo_pair": ("exo_pair", {"label_smoothing": 0.05}),
  "nca_pair": ("nca", {}),
  "robust": ("robust_dpo", {"eps": 0.0}),  # TRL's label_smoothing defaults to 0.0
  "bco_pair": ("bco_pair", {}),
  "sppo_hard": ("sppo_hard", {}),
  "aot": ("aot", {}),
  "aot_unpaired": ("aot_unpaired", {}),
  "apo_zero": ("apo_zero", {}),
  "apo_down": ("apo_down", {}),
  "discopop": ("discopop", {}),
  "sft": ("sft", {}),
  "sigmoid_norm": ("ln_dpo", {"beta": 0.1}),  # ln_dpo has no default beta; TRL's is 0.1
}


def test_canonical_map_is_complete_and_matches_the_namespace():
  assert set(TRL_TO_CANONICAL) == set(pofx.losses.trl.names()) == set(_trl.TRL_LOSS_TYPES)
  for loss_type, (canonical, _) in TRL_TO_CANONICAL.items():
    assert pofx.losses.trl.canonical(loss_type) == canonical
    assert canonical in pofx.losses.names()


@pytest.mark.parametrize("loss_type", sorted(TRL_TO_CANONICAL))
def test_trl_name_is_its_canonical_formula(loss_type):
  canonical, hyper = TRL_TO_CANONICAL[loss_type]
  trl_hyper = {"label_smoothing": 0.05} if loss_type == "exo_pair" else {}
  reference = None if loss_type == "sft" else REFERENCE
  _same(
    pofx.losses.trl.get(loss_type)(POLICY, reference, **trl_hyper),
    pofx.losses.get(canonical)(POLICY, reference, **hyper),
    tol=2e-6,
  )
  for beta in (0.3,) if "beta" in pofx.losses.spec(canonical).hyperparameters else ():
    _same(
      pofx.losses.trl.get(loss_type)(POLICY, reference, **{**trl_hyper, "beta": beta}),
      pofx.losses.get(canonical)(POLICY, reference, **{**hyper, "beta": beta}),
      tol=2e-6,
    )


def test_trl_names_that_differ_are_not_canonical():
  for loss_type in ("sigmoid", "hinge", "nca_pair", "robust", "sigmoid_norm"):
    assert loss_type not in pofx.losses.REGISTRY
    with pytest.raises(ValueError, match=f"{pofx.losses.trl.canonical(loss_type)!r}.*'trl.{loss_type}'"):
      pofx.losses.get(loss_type)
  with pytest.raises(ValueError, match="loss_type"):
    pofx.losses.trl.get("dpo")


def test_every_trl_attribute_is_get():
  for loss_type in pofx.losses.trl.names():
    assert getattr(pofx.losses.trl, loss_type) is pofx.losses.trl.get(loss_type) is pofx.losses.get(f"trl.{loss_type}")
