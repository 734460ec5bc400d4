"""Parity of pofx's TRL losses with TRL 1.16's own `DPOTrainer._compute_loss`.

The expected values come from TRL's code, run on a stub causal LM: TRL's `DataCollatorForPreference`
lays out the batch ([chosen; rejected] rows, prompt + completion, right padding, completion_mask),
TRL builds the labels, and the stub returns what a model patched with TRL's fused LM head returns
(`FusedCausalLMOutput`: per-token log-probs of `labels[:, 1:]` from the logits at the previous
position, zero where the label is -100, plus entropy / log_sum_sq_probs / mean_logits / is_top1).
The reference log-probs are computed by TRL too: precomputed with `DPOTrainer.compute_ref_log_probs`
(which applies TRL's own LD weighting) or, in the `ref_model` path, inside `_compute_loss`.

pofx gets per-token log-probs of the same completion tokens from the same logits, in its own layout
(completion-only, left-aligned, different padded widths for chosen and rejected, NaN on padding).
"""

import collections
import contextlib
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from trl import DPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer
from trl.trainer.utils import FusedCausalLMOutput

import pofx
from pofx.losses import _trl

V, PAD = 11, 0
PROMPT_LENS = [3, 1, 4, 2, 5]
CHOSEN_LENS = [4, 1, 6, 3, 5]  # unequal to the rejected lengths in 4 of the 5 pairs
REJECTED_LENS = [2, 5, 6, 7, 1]
B = len(PROMPT_LENS)
TOL = dict(rtol=1e-5, atol=1e-5)


class StubLM(torch.nn.Module):
  """A causal LM given by a fixed logits table `[2B, L, V]`, called the way TRL calls a model."""

  def __init__(self, logits):
    super().__init__()
    self.logits = torch.nn.Parameter(torch.tensor(logits, dtype=torch.float32))
    self.is_gradient_checkpointing = False

  def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None):
    assert fused_lm_head and labels is not None and input_ids.shape == self.logits.shape[:2]
    logits, targets = self.logits[:, :-1], labels[:, 1:]
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1)
    zero = lambda x: x.masked_fill(~mask, 0)
    return FusedCausalLMOutput(
      log_probs=zero(torch.gather(logp, -1, targets.clamp(min=0)[..., None])[..., 0]),
      entropy=zero(-(logp.exp() * logp).sum(-1)).detach(),
      log_sum_sq_probs=zero(torch.logsumexp(2.0 * logp, dim=-1)).detach(),
      mean_logits=zero(logits.mean(-1)).detach(),
      is_top1=(logits.argmax(-1) == targets) & mask,
      label_mask=mask,
    )


class _Accelerator:
  """The few accelerate.Accelerator members `_compute_loss` uses, on one CPU process."""

  device = torch.device("cpu")

  def gather_for_metrics(self, x):
    return x

  gather = gather_for_metrics

  def autocast(self):
    return contextlib.nullcontext()


def _data(seed=0):
  rng = np.random.default_rng(seed)
  tok = lambda n: [int(t) for t in rng.integers(1, V, n)]
  examples = [
    dict(prompt_ids=tok(p), chosen_ids=tok(c), rejected_ids=tok(r))
    for p, c, r in zip(PROMPT_LENS, CHOSEN_LENS, REJECTED_LENS)
  ]
  inputs = DataCollatorForPreference(pad_token_id=PAD)(examples, return_tensors="pt")
  length = inputs["input_ids"].shape[1]
  policy_logits = rng.normal(0.0, 2.0, (2 * B, length, V)).astype(np.float32)
  ref_logits = (policy_logits + rng.normal(0.0, 0.4, policy_logits.shape)).astype(np.float32)
  return examples, inputs, policy_logits, ref_logits


def _log_softmax64(logits):
  x = logits.astype(np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _pofx_pairs(examples, logits, width_pad=(2, 1)):
  """PairLogps in pofx's layout: completion token k of pair i is scored by the logits at prompt+k-1."""
  logp = _log_softmax64(logits)
  lssp = np.log(np.exp(2.0 * logp).sum(-1))
  sides = {}
  for side, row0, extra in (("chosen", 0, width_pad[0]), ("rejected", B, width_pad[1])):
    lens = [len(ex[f"{side}_ids"]) for ex in examples]
    t = max(lens) + extra
    tok = np.full((B, t), np.nan, np.float32)
    sq = np.full((B, t), np.nan, np.float32)
    mask = np.zeros((B, t), np.float32)
    for i, ex in enumerate(examples):
      p = len(ex["prompt_ids"])
      for k, y in enumerate(ex[f"{side}_ids"]):
        tok[i, k] = logp[row0 + i, p + k - 1, y]
        sq[i, k] = lssp[row0 + i, p + k - 1]
        mask[i, k] = 1.0
    sides[side] = (tok, mask, sq)
  return pofx.PairLogps.from_tokens(
    sides["chosen"][0],
    sides["chosen"][1],
    sides["rejected"][0],
    sides["rejected"][1],
    chosen_log_sum_sq_probs=sides["chosen"][2],
    rejected_log_sum_sq_probs=sides["rejected"][2],
  )


EXAMPLES, INPUTS, POLICY_LOGITS, REF_LOGITS = _data()
POLICY = _pofx_pairs(EXAMPLES, POLICY_LOGITS)
REFERENCE = _pofx_pairs(EXAMPLES, REF_LOGITS)


def _trl_trainer(loss_type, ref_path="precomputed", **config):
  """A TRL 1.16 DPOTrainer on the shared batch, set up as `DPOTrainer.__init__` does, and its inputs."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    args = DPOConfig(
      output_dir="/tmp/pofx_trl_parity",
      bf16=False,
      report_to=[],
      loss_type=loss_type,
      precompute_ref_log_probs=(ref_path == "precomputed"),
      **config,
    )
  trainer = object.__new__(DPOTrainer)
  trainer.args = args
  trainer.model = StubLM(POLICY_LOGITS)
  trainer.ref_model = StubLM(REF_LOGITS)
  trainer.accelerator = _Accelerator()
  trainer.aux_loss_enabled = False
  trainer._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
  trainer._total_train_tokens = 0
  trainer._tp_size = 1
  # The "Training arguments" block of DPOTrainer.__init__ (TRL 1.16).
  trainer.beta = args.beta
  trainer.precompute_ref_logps = args.precompute_ref_log_probs
  trainer.loss_types = args.loss_type
  trainer.loss_weights = args.loss_weights or [1.0] * len(trainer.loss_types)
  trainer.ld_alpha = args.ld_alpha
  trainer.f_divergence_type = args.f_divergence_type
  trainer.f_alpha_divergence_coef = args.f_alpha_divergence_coef
  trainer.label_smoothing = args.label_smoothing
  trainer.use_weighting = args.use_weighting
  inputs = dict(INPUTS)
  if ref_path == "precomputed":
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    inputs.update(ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
  return trainer, inputs


def trl_value(loss_type, ref_path="precomputed", **config):
  """TRL 1.16's `_compute_loss` on the shared batch, the trainer set up as `DPOTrainer.__init__` does."""
  trainer, inputs = _trl_trainer(loss_type, ref_path, **config)
  loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
  return float(loss.detach())


def trl_precomputed_reference(**config):
  """TRL's precomputed reference (`precompute_ref_log_probs`): the sums it stores, as a sums-only PairLogps."""
  _, inputs = _trl_trainer("sigmoid", "precomputed", **config)
  f = lambda t: np.asarray(t.detach().numpy(), np.float32)
  return pofx.PairLogps(chosen=f(inputs["ref_chosen_logps"]), rejected=f(inputs["ref_rejected_logps"]))


def _types(loss_type):
  return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def check_parity(loss_type, ref_path="precomputed", **config):
  expected = trl_value(loss_type, ref_path, **config)
  assert np.isfinite(expected)
  combined = float(_trl.trl_dpo_loss(POLICY, REFERENCE, loss_type=loss_type, **config))
  np.testing.assert_allclose(combined, expected, **TOL)
  if isinstance(loss_type, str):
    hyper = {k: v for k, v in config.items() if k != "loss_weights"}
    spec = pofx.losses.trl.spec(loss_type)
    # Pass only the modifiers the registered function takes (the others do not affect this type in TRL).
    hyper = {k: v for k, v in hyper.items() if k in spec.hyperparameters}
    reference = REFERENCE if spec.reference != "unused" else None
    single = float(pofx.losses.trl.batch_loss(loss_type, POLICY, reference, **hyper))
    np.testing.assert_allclose(single, expected, **TOL)
    # The same value under the qualified name that the training program's train.loss reads.
    np.testing.assert_allclose(
      float(pofx.losses.batch_loss(f"trl.{loss_type}", POLICY, reference, **hyper)), single, rtol=1e-7, atol=0.0
    )
  return expected


# --------------------------------------------------------------------------------------------


def test_batch_layout():
  """The batch really has unequal, padded completions, and pofx saw the tokens TRL scores."""
  cm = INPUTS["completion_mask"].numpy()
  assert cm.shape[0] == 2 * B
  np.testing.assert_array_equal(cm[:B].sum(1), CHOSEN_LENS)
  np.testing.assert_array_equal(cm[B:].sum(1), REJECTED_LENS)
  assert (INPUTS["attention_mask"].numpy() == 0).any()  # right padding present
  assert np.any(np.array(CHOSEN_LENS) != np.array(REJECTED_LENS))
  out = StubLM(POLICY_LOGITS)(
    INPUTS["input_ids"],
    labels=INPUTS["input_ids"].masked_fill(INPUTS["completion_mask"] == 0, -100),
    fused_lm_head=True,
  )
  sums = out.log_probs.detach().numpy().sum(1)
  np.testing.assert_allclose(sums[:B], np.asarray(POLICY.chosen), **TOL)
  np.testing.assert_allclose(sums[B:], np.asarray(POLICY.rejected), **TOL)


@pytest.mark.parametrize("ref_path", ["precomputed", "ref_model"])
@pytest.mark.parametrize("loss_type", [t for t in _trl.TRL_LOSS_TYPES if t != "exo_pair"])
def test_loss_type_defaults(loss_type, ref_path):
  check_parity(loss_type, ref_path)


@pytest.mark.parametrize("label_smoothing", [1e-3, 0.2])
def test_exo_pair(label_smoothing):
  check_parity("exo_pair", label_smoothing=label_smoothing)


@pytest.mark.parametrize(
  "loss_type,label_smoothing", [("robust", 0.1), ("robust", 0.3), ("aot", 0.1), ("aot", 0.4), ("aot_unpaired", 0.25)]
)
def test_label_smoothing(loss_type, label_smoothing):
  check_parity(loss_type, label_smoothing=label_smoothing)


@pytest.mark.parametrize(
  "f_divergence_type,coef",
  [
    ("forward_kl", 0.5),
    ("js_divergence", 0.5),
    ("alpha_divergence", 0.5),
    ("alpha_divergence", 0.2),
    ("alpha_divergence", 1.0),
    ("alpha_divergence", 1.6),
  ],
)
@pytest.mark.parametrize("loss_type", sorted(_trl.F_DIVERGENCE_LOSS_TYPES))
def test_f_divergence(loss_type, f_divergence_type, coef):
  extra = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust") else {}
  check_parity(loss_type, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef, **extra)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("ref_path", ["precomputed", "ref_model"])
def test_ld_alpha_values(ld_alpha, ref_path):
  check_parity("sigmoid", ref_path, ld_alpha=ld_alpha)


@pytest.mark.parametrize("loss_type", _trl.TRL_LOSS_TYPES)
def test_ld_alpha_every_loss_type(loss_type):
  extra = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust", "aot", "aot_unpaired") else {}
  check_parity(loss_type, ld_alpha=0.3, **extra)


@pytest.mark.parametrize("loss_type", [t for t in _trl.TRL_LOSS_TYPES if t not in ("aot", "aot_unpaired", "sft")])
def test_use_weighting(loss_type):
  extra = {"label_smoothing": 0.1} if loss_type in ("exo_pair", "robust") else {}
  check_parity(loss_type, use_weighting=True, **extra)


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_discopop_tau(tau):
  check_parity("discopop", discopop_tau=tau)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sppo_hard", "apo_down", "nca_pair"])
def test_beta(loss_type):
  check_parity(loss_type, beta=0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "discopop"])
def test_modifiers_together(loss_type):
  check_parity(
    loss_type,
    "ref_model",
    beta=0.3,
    f_divergence_type="alpha_divergence",
    f_alpha_divergence_coef=0.3,
    ld_alpha=0.6,
    use_weighting=True,
  )


@pytest.mark.parametrize(
  "loss_type,config",
  [
    (["sigmoid", "sft"], dict(loss_weights=[1.0, 0.5])),
    (["sigmoid", "bco_pair", "sft"], {}),
    (["sigmoid", "bco_pair", "sft"], dict(loss_weights=[0.8, 0.2, 1.0])),  # MPO
    (["apo_zero", "ipo", "sft"], dict(loss_weights=[0.3, 0.2, 1.0], ld_alpha=0.5)),
    (["apo_zero", "ipo", "discopop"], dict(loss_weights=[0.3, 0.2, 1.0], use_weighting=True, ld_alpha=0.5)),
    (
      ["robust", "exo_pair", "hinge", "sft"],
      dict(loss_weights=[1.0, 0.5, 0.25, 2.0], label_smoothing=0.1, f_divergence_type="js_divergence"),
    ),
    (["aot", "aot_unpaired", "nca_pair"], dict(label_smoothing=0.1, beta=0.2)),
  ],
)
def test_loss_type_lists(loss_type, config):
  check_parity(loss_type, **config)


def test_sft_is_token_mean_of_chosen_nll():
  """TRL's sft value, checked directly: the batch's chosen NLL over its chosen-token count."""
  expected = trl_value("sft")
  manual = -float(np.asarray(POLICY.chosen).sum()) / sum(CHOSEN_LENS)
  np.testing.assert_allclose(expected, manual, **TOL)


def test_parity_detects_a_wrong_modifier():
  """The harness is sensitive: a modifier TRL applies changes TRL's value beyond the tolerance."""
  base = trl_value("sigmoid")
  for config in (dict(ld_alpha=0.5), dict(use_weighting=True), dict(f_divergence_type="js_divergence"), dict(beta=0.2)):
    assert abs(trl_value("sigmoid", **config) - base) > 1e-3, config


def test_sft_with_weighting_fails_in_trl_and_is_refused():
  """TRL 1.16 cannot compute "sft" with use_weighting (in-place multiply into an expanded tensor); pofx refuses it."""
  with pytest.raises(RuntimeError):
    trl_value(["sigmoid", "sft"], use_weighting=True)
  with pytest.raises(ValueError, match="use_weighting"):
    _trl.trl_dpo_loss(POLICY, REFERENCE, loss_type=["sigmoid", "sft"], use_weighting=True)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_with_weighting_refused_by_both(loss_type):
  """TRL's __init__ refuses WPO weighting for the sorting losses; so does pofx, under both names."""
  with pytest.raises(ValueError, match="use_weighting"):
    _trl.trl_dpo_loss(POLICY, REFERENCE, loss_type=loss_type, use_weighting=True)
  with pytest.raises(ValueError, match="invalid use_weighting=True"):
    pofx.losses.trl.batch_loss(loss_type, POLICY, REFERENCE, use_weighting=True)


def _every_field(loss_type):
  """Every DPOConfig loss field at a non-default value that TRL 1.16 accepts for `loss_type`."""
  return dict(
    beta=0.3,
    f_divergence_type="alpha_divergence" if loss_type in _trl.F_DIVERGENCE_LOSS_TYPES else "reverse_kl",
    f_alpha_divergence_coef=0.3,
    ld_alpha=0.4,
    label_smoothing=0.1,
    use_weighting=loss_type not in ("aot", "aot_unpaired", "sft"),
    discopop_tau=0.2,
  )


@pytest.mark.parametrize("loss_type", _trl.TRL_LOSS_TYPES)
def test_every_loss_type_takes_every_dpo_config_field(loss_type):
  # As TRL's DPOConfig: beta with "sft", label_smoothing with "sigmoid", ... are accepted, and the
  # value is TRL's own on the same inputs (fields a loss type does not use change nothing).
  assert set(pofx.losses.trl.spec(loss_type).hyperparameters) == set(pofx.losses.trl.DPO_CONFIG_LOSS_FIELDS)
  fields = _every_field(loss_type)
  expected = trl_value(loss_type, **fields)
  reference = None if loss_type == "sft" else REFERENCE
  np.testing.assert_allclose(float(pofx.losses.trl.batch_loss(loss_type, POLICY, reference, **fields)), expected, **TOL)
  np.testing.assert_allclose(
    float(pofx.losses.batch_loss(f"trl.{loss_type}", POLICY, reference, **fields)), expected, **TOL
  )
  per_pair = pofx.losses.trl.get(loss_type)(POLICY, reference, **fields)
  assert per_pair.shape == (B,)
  with pytest.raises(ValueError, match="unknown argument"):
    pofx.losses.trl.batch_loss(loss_type, POLICY, reference, rpo_alpha=1.0)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "apo_zero", "aot", "nca_pair"])
def test_ld_alpha_with_a_precomputed_sums_only_reference(loss_type, ld_alpha):
  # TRL's precomputed reference holds sums only, LD-weighted when they were computed; pofx takes a
  # sums-only reference the same way, and ld_weighted_sums reproduces TRL's stored sums.
  sums = trl_precomputed_reference(ld_alpha=ld_alpha)
  mine = pofx.losses.ld_weighted_sums(REFERENCE, ld_alpha)
  assert not mine.has_tokens
  np.testing.assert_allclose(mine.chosen, sums.chosen, **TOL)
  np.testing.assert_allclose(mine.rejected, sums.rejected, **TOL)
  expected = trl_value(loss_type, "precomputed", ld_alpha=ld_alpha)
  np.testing.assert_allclose(
    float(pofx.losses.trl.batch_loss(loss_type, POLICY, sums, ld_alpha=ld_alpha)), expected, **TOL
  )
  np.testing.assert_allclose(
    float(_trl.trl_dpo_loss(POLICY, sums, loss_type=loss_type, ld_alpha=ld_alpha)), expected, **TOL
  )
  if loss_type == "sigmoid":  # the canonical LD-DPO too
    np.testing.assert_allclose(
      float(pofx.losses.batch_loss("ld_dpo", POLICY, sums, ld_alpha=ld_alpha)), expected, **TOL
    )


def test_the_dpo_config_loss_fields_are_trls_with_its_defaults():
  defaults = {f.name: f.default for f in dataclasses.fields(DPOConfig)}
  for name, default in pofx.losses.trl.DPO_CONFIG_LOSS_FIELDS.items():
    assert defaults[name] == default, name
  assert "loss_type" in defaults and "loss_weights" in defaults  # the two that select and combine (trl_dpo_loss)
