"""GDPO against the authors' loss, run in torch on the same logits.

`_authors_token_logps` and `_authors_gdpo` transcribe ggoggam/gdpo's `ComputeMixin.compute_token_logps`
(src/mixin/utilities.py) and `GDPOTrainer.loss` (src/algo/offline/gdpo.py) line by line, on
`[2B, L]` right-padded rows (chosen rows, then rejected rows; labels -100 on the prompt and the
padding) as their collate function builds them. pofx's side gets the same logits as the
hidden states of a fused `PairBatch` times an identity head, through `pofx.logprobs.pair_logps`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pofx
from pofx import batching, logprobs

EOS, V, ALPHA, GAMMA = 2, 11, 0.1, 0.1


def _authors_token_logps(logits, labels, slide_mask=False, temperature=1.0):
  shifted_logps = (logits / temperature).log_softmax(dim=-1)[:, :-1, :]
  shifted_labels = labels[:, 1:].clone()
  mask = shifted_labels.not_equal(-100)
  shifted_labels[~mask] = 0
  logps = shifted_logps.gather(dim=-1, index=shifted_labels.unsqueeze(dim=-1)).squeeze(dim=-1)
  if slide_mask:
    first_unmasked = torch.nonzero(mask.cumsum(dim=1) == 1)
    first_unmasked[:, -1] -= 1
    mask[first_unmasked[:, 0], first_unmasked[:, 1]] = True
  return logps * mask, mask


def _authors_gdpo(policy_logits, ref_logits, labels, *, slide_mask, alpha=ALPHA, gamma=GAMMA):
  policy_logps, mask = _authors_token_logps(policy_logits, labels, slide_mask=slide_mask)
  with torch.no_grad():
    ref_logps, _ = _authors_token_logps(ref_logits, labels, slide_mask=slide_mask)
    log_rewards = ref_logps + (ref_logits / gamma).log_softmax(dim=-1)[:, :-1, EOS]
    half = log_rewards.shape[0] // 2
    scores = torch.cat((log_rewards.new_full((half, 1), fill_value=0), log_rewards.new_full((half, 1), fill_value=-8)))
    scores = scores * alpha
    for i in range(len(log_rewards)):
      last_index = mask[i].nonzero()[-1]
      log_rewards[i, last_index] += scores[i]
  eos_logps = policy_logits.log_softmax(dim=-1)[:, :-1, EOS]
  log_flows = log_rewards - eos_logps
  detailed_balance = log_flows[:, :-1] - log_flows[:, 1:] + policy_logps[:, :-1]
  return (detailed_balance * mask[:, :-1]).pow(2).sum(dim=-1).mean()


# Three pairs; prompts of 2-4 tokens, completions of 1-5 (a one-token one included). Rows are
# padded to L = 16 > every prompt + completion, so no sequence reaches the padded end.
PROMPTS = [[5, 7, 1], [3, 9], [4, 4, 8, 6]]
CHOSEN = [[6, 3, 2], [1], [9, 9, 5, 7, 2]]
REJECTED = [[8, 2], [10, 6, 3, 4], [5]]


def _fused_case(seed, chosen=CHOSEN, rejected=REJECTED):
  batch = batching.fused(PROMPTS, chosen, rejected, seq_bucket=16, completion_bucket=8)
  rng = np.random.default_rng(seed)
  R, L = batch.tokens.shape
  logits = (rng.normal(size=(2, R, L, V)) * 2.0).astype(np.float32)  # policy, reference
  labels = np.full((R, L), -100, np.int64)
  for b, (p, c, r) in enumerate(zip(PROMPTS, chosen, rejected)):
    labels[b, len(p) : len(p) + len(c)] = c
    labels[len(PROMPTS) + b, len(p) : len(p) + len(r)] = r
  return batch, logits, labels


@functools.partial(jax.jit, static_argnames=("eos_temperature",))
def _pofx_logps(batch, logits, eos_temperature=None):
  # logits as hidden states with an identity head: z = h I
  eye = jnp.eye(V, dtype=jnp.float32)
  return logprobs.pair_logps(logits, eye, batch, eos_id=EOS, eos_temperature=eos_temperature)


@jax.jit
def _pofx_loss_and_grad(batch, policy_logits, reference):
  loss = lambda z: jnp.mean(pofx.losses.gdpo(_pofx_logps(batch, z), reference, alpha=ALPHA, gamma=GAMMA))
  return jax.value_and_grad(loss)(policy_logits)


def test_gdpo_equals_the_authors_loss_on_the_same_logits():
  batch, logits, labels = _fused_case(0)
  reference = _pofx_logps(batch, logits[1], eos_temperature=GAMMA)
  ours, grad = _pofx_loss_and_grad(batch, logits[0], reference)
  t = lambda x: torch.tensor(x, dtype=torch.float64)
  theirs = _authors_gdpo(t(logits[0]), t(logits[1]), torch.tensor(labels), slide_mask=False)
  np.testing.assert_allclose(float(ours), float(theirs), rtol=2e-5)
  # gradients with respect to the policy's logits: autograd of their loss, and of ours through pofx.logprobs
  pol = t(logits[0]).requires_grad_(True)
  _authors_gdpo(pol, t(logits[1]), torch.tensor(labels), slide_mask=False).backward()
  np.testing.assert_allclose(np.asarray(grad), pol.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_the_authors_slid_position_adds_one_residual_at_the_prompt():
  # Their slide_mask=True adds, per sequence, the residual at the prompt's second-to-last
  # position j = P - 2 (state s_-1), whose "token" is vocabulary id 0:
  #   (log F(s_-1) - log F(s_0) + log pi(0 | s_-1))^2,  log F(s) = log R(s) - log pi(EOS | s),
  #   log R(s_-1) = log ref(0 | s_-1) + log ref_gamma(EOS | s_-1),
  #   log R(s_0) = log ref(y_0 | s_0) + log ref_gamma(EOS | s_0).
  # pofx leaves it out; the difference is exactly that residual, derived here in numpy. (Completions
  # of two tokens or more: for a one-token completion their slide marks every position from P - 2
  # to the row's end, where the mask's running count stays 1.)
  chosen, rejected = [[6, 3, 2], [1, 4], [9, 9, 5, 7, 2]], [[8, 2], [10, 6, 3, 4], [5, 3]]
  batch, logits, labels = _fused_case(1, chosen, rejected)
  reference = _pofx_logps(batch, logits[1], eos_temperature=GAMMA)
  ours = float(_pofx_loss_and_grad(batch, logits[0], reference)[0])
  t = lambda x: torch.tensor(x, dtype=torch.float64)
  theirs = float(_authors_gdpo(t(logits[0]), t(logits[1]), torch.tensor(labels), slide_mask=True))

  def log_softmax(z):
    z = np.asarray(z, np.float64)
    return z - np.log(np.sum(np.exp(z - z.max())) + 0.0) - z.max()

  extra = []
  rows = [(p, c) for p, c in zip(PROMPTS, chosen)] + [(p, r) for p, r in zip(PROMPTS, rejected)]
  for i, (p, y) in enumerate(rows):
    P = len(p)
    pol, ref = logits[0][i], logits[1][i]
    log_f_prev = log_softmax(ref[P - 2])[0] + log_softmax(ref[P - 2] / GAMMA)[EOS] - log_softmax(pol[P - 2])[EOS]
    log_r0 = log_softmax(ref[P - 1])[y[0]] + log_softmax(ref[P - 1] / GAMMA)[EOS]
    log_f0 = log_r0 - log_softmax(pol[P - 1])[EOS]
    extra.append((log_f_prev - log_f0 + log_softmax(pol[P - 2])[0]) ** 2)
  np.testing.assert_allclose(theirs, ours + np.mean(extra), rtol=2e-5)


@pytest.mark.parametrize("layout", ["fused", "prompt_shared", "packed"])
def test_state_index_points_at_each_state(layout):
  # State t of a completion is the position holding token t - 1 of it (the prompt's last token for
  # t = 0), at RoPE position P - 1 + t: read back from the batch's own tokens and positions.
  kw = {"row_length": 48} if layout == "packed" else {"seq_bucket": 16}
  batch = batching.build(layout, PROMPTS, CHOSEN, REJECTED, completion_bucket=8, **kw)
  tokens, positions = np.asarray(batch.tokens).reshape(-1), np.asarray(batch.positions).reshape(-1)
  for idx, completions in zip(batching.state_index(batch), (CHOSEN, REJECTED)):
    for b, (p, y) in enumerate(zip(PROMPTS, completions)):
      states = idx[b, : len(y) + 1]
      assert list(tokens[states]) == [p[-1], *y], (layout, b)
      assert list(positions[states]) == list(range(len(p) - 1, len(p) + len(y))), (layout, b)
      assert not idx[b, len(y) + 1 :].any()


def test_eos_logps_are_the_eos_column_at_each_state():
  batch, logits, _ = _fused_case(2)
  out = _pofx_logps(batch, logits[1], eos_temperature=GAMMA)
  z = logits[1].astype(np.float64)
  for side, completions, row0 in (("chosen", CHOSEN, 0), ("rejected", REJECTED, len(PROMPTS))):
    eos, tempered = (
      np.asarray(getattr(out, f"{side}_eos_logps")),
      np.asarray(getattr(out, f"{side}_tempered_eos_logps")),
    )
    assert eos.shape == (3, 9)
    for b, (p, y) in enumerate(zip(PROMPTS, completions)):
      rows = z[row0 + b, len(p) - 1 : len(p) + len(y)]  # the logits at states s_0..s_n
      lse = np.log(np.sum(np.exp(rows), -1))
      lse_g = np.log(np.sum(np.exp(rows / GAMMA), -1))
      np.testing.assert_allclose(eos[b, : len(y) + 1], rows[:, EOS] - lse, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(tempered[b, : len(y) + 1], rows[:, EOS] / GAMMA - lse_g, rtol=1e-5, atol=1e-4)
      assert not eos[b, len(y) + 1 :].any() and not tempered[b, len(y) + 1 :].any()


def test_missing_inputs_and_bad_values_are_named():
  batch, logits, _ = _fused_case(3)
  with_eos = _pofx_logps(batch, logits[0], eos_temperature=GAMMA)
  plain = pofx.PairLogps.from_tokens(
    with_eos.chosen_token_logps, with_eos.chosen_mask, with_eos.rejected_token_logps, with_eos.rejected_mask
  )
  with pytest.raises(ValueError, match="gdpo needs the policy's per-state chosen_eos_logps"):
    pofx.losses.gdpo(plain, with_eos)
  with pytest.raises(ValueError, match="gdpo needs the reference's per-state chosen_tempered_eos_logps"):
    pofx.losses.gdpo(with_eos, plain)
  with pytest.raises(ValueError, match=r"gdpo: invalid gamma=0.0; allowed: gamma > 0"):
    pofx.losses.gdpo(with_eos, with_eos, gamma=0.0)
  with pytest.raises(ValueError, match="eos_id needs the outputs at every position"):
    logprobs.pair_logps(np.zeros((4, V)), np.eye(V), batch, eos_id=EOS, scored=batching.scored_tokens(batch))
