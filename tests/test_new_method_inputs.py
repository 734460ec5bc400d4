"""The inputs of the methods that read more than a pair's log-probs, from the data path to the program:
KTO's mismatched pairs (loader and train step), the loader's per-pair inputs, the world's embeddings
and segment scores, and their config checks (configs/new_methods.py's members are trained by
tests/test_experiments.py's sweep test)."""

import math
import types

import jax
import numpy as np
import optax
import pytest

import pofx
from configs import validate
from experiments import main as main_lib
from pofx import batching, data, world
from tests import toy
from tests.program import _config

# -------------------------------------------------------------------------------------------------
# KTO's KL batch
# -------------------------------------------------------------------------------------------------


def _examples(n, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      "prompt": rng.integers(4, 30, size=int(rng.integers(2, 6))).astype(np.int32),
      "chosen": rng.integers(4, 30, size=int(rng.integers(1, 7))).astype(np.int32),
      "rejected": rng.integers(4, 30, size=int(rng.integers(1, 7))).astype(np.int32),
      "score_chosen": np.float32(1.0),
      "score_rejected": np.float32(0.0),
      "example_id": i,
    }
    for i in range(n)
  ]


def _loader(src, **kw):
  return data.PreferenceLoader(
    src,
    batch_size=kw.pop("batch_size", 4),
    layout="prompt_shared",
    layout_kwargs=dict(seq_bucket=8, completion_bucket=8),
    shuffle=False,
    num_epochs=1,
    process_index=0,
    process_count=1,
    num_threads=0,
    **kw,
  )


def test_loader_kl_pairs_give_each_prompt_the_previous_pairs_completions():
  src = _examples(8)
  batch = _loader(src, kl_pairs=True).batch_at(1)
  ex = src[4:8]
  prev = [ex[-1]] + ex[:-1]  # pair i with pair i - 1's completions (TRL's shift), pair 0 with the last
  want = batching.build(
    "prompt_shared",
    [e["prompt"] for e in ex],
    [e["chosen"] for e in prev],
    [e["rejected"] for e in prev],
    num_pairs=4,
    seq_bucket=8,
    completion_bucket=8,
  )
  kl = batch["kl"]["pairs"]
  for field in ("tokens", "chosen_targets", "rejected_targets", "chosen_mask", "rejected_mask"):
    np.testing.assert_array_equal(getattr(kl, field), getattr(want, field))
  np.testing.assert_array_equal(kl.chosen_targets[1], batch["pairs"].chosen_targets[0])
  with pytest.raises(ValueError, match="at least 2 pairs"):
    _loader(src, kl_pairs=True, batch_size=1).batch_at(0)


def test_loader_pair_inputs_are_added_and_checked():
  src = _examples(8)
  lens = lambda examples, pairs: {"chosen_lens": np.array([e["chosen"].size for e in examples])}
  batch = _loader(src, pair_inputs=lens).batch_at(0)
  np.testing.assert_array_equal(batch["chosen_lens"], [e["chosen"].size for e in src[:4]])
  with pytest.raises(ValueError, match=r"pair_inputs\['x'\] has shape \(3,\)"):
    _loader(src, pair_inputs=lambda e, p: {"x": np.zeros(3)}).batch_at(0)


def _numpy_toy_logps(params, last, tokens, mask):
  """The toy bigram model written again in numpy: sum_t mask_t log softmax(emb[prev] @ w + bias)[y_t]."""
  emb, w, bias = (np.asarray(params[k], np.float64) for k in ("emb", "w", "bias"))
  prev = np.concatenate([np.asarray(last)[:, None], np.asarray(tokens)[:, :-1]], axis=1)
  logits = emb[prev] @ w + bias
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  tok = np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]
  return (tok * np.asarray(mask)).sum(-1)


def test_train_step_scores_the_kl_pairs_for_ktos_reference_point():
  b = toy.batch(seed=1, b=6, t=5)
  roll = lambda x: np.roll(np.asarray(x), 1, axis=0)  # pair i gets pair i - 1's completions
  kl = {
    "last_prompt_token": b["last_prompt_token"],
    **{k: roll(b[k]) for k in ("chosen_tokens", "chosen_mask", "rejected_tokens", "rejected_mask")},
  }

  def logratios(pol, ref, batch):
    side = lambda s, p: _numpy_toy_logps(p, batch["last_prompt_token"], batch[f"{s}_tokens"], batch[f"{s}_mask"])
    return side("chosen", pol) - side("chosen", ref), side("rejected", pol) - side("rejected", ref)

  policy, ref = toy.init(0), toy.init(3)
  if np.mean(np.concatenate(logratios(policy, ref, kl))) < 0:  # a positive z0 (not clamped at 0)
    policy, ref = ref, policy
  kl_c, kl_r = logratios(policy, ref, kl)
  z0 = max(0.0, float(np.mean(np.concatenate([kl_c, kl_r]))))
  assert z0 > 0.05
  lr_w, lr_l = logratios(policy, ref, b)
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  want = np.mean(0.5 * ((1 - sig(0.1 * (lr_w - z0))) + (1 - sig(0.1 * (z0 - lr_l)))))

  reference = pofx.references.frozen(ref, toy.logps_fn)
  opt = optax.sgd(0.0)
  step = pofx.train.make_train_step(toy.logps_fn, opt, loss="kto", reference=reference)
  state = pofx.train.init_state(policy, opt, reference, pofx.perturbations.none(), loss="kto")
  _, m = step(state, {**b, "kl": kl}, jax.random.key(0))
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)

  cached = pofx.references.cached("fp", "fp")
  step = pofx.train.make_train_step(toy.logps_fn, opt, loss="kto", reference=cached, jit=False)
  state = pofx.train.init_state(policy, opt, cached, pofx.perturbations.none(), loss="kto")
  with pytest.raises(ValueError, match="cached reference has none"):
    step(state, {**b, "kl": kl, "ref_chosen_logps": np.zeros(6), "ref_rejected_logps": np.zeros(6)}, jax.random.key(0))


# -------------------------------------------------------------------------------------------------
# The world's annotations
# -------------------------------------------------------------------------------------------------


def test_world_embeddings_and_segment_scores_by_hand():
  w = world.World(world.WorldConfig(seed=0))
  c4 = lambda *xs: [4 + x for x in xs]
  prompt = np.array([world.BOS] + c4(2, 5) + [world.SEP])
  # Content 1 1 3, a stray SEP, content 0, EOS, then a token after EOS (ignored).
  y = np.array(c4(1, 1, 3) + [world.SEP] + c4(0) + [world.EOS] + c4(7))
  aff = (w.affinity_table[2] + w.affinity_table[5]) / math.sqrt(2.0)
  np.testing.assert_allclose(w.embed_prompt(prompt), aff, rtol=1e-6)
  np.testing.assert_allclose(w.embed_completion(y)[[0, 1, 3]], [0.25, 0.5, 0.25])
  assert w.embed_completion(y).sum() == pytest.approx(1.0)
  ids, scores = w.segment_scores(prompt, y, 3)
  np.testing.assert_array_equal(ids, [0, 0, 0, 1, 1, 1, 2])
  sig = lambda x: 1.0 / (1.0 + math.exp(-x))
  g = w.bigram_table
  want = np.full((4, 2), 0.5)
  want[0] = [sig((2 * aff[1] + aff[3]) / 3), 0.5 * (1 + (g[1, 1] + g[1, 3]) / 2)]
  want[1, 0] = sig((-2.0 + aff[0]) / 2)  # the SEP counts -invalid_token_penalty; no content bigram ends here
  np.testing.assert_allclose(scores, want, rtol=1e-6)
  assert w.num_segments(3) == 4 and w.num_segments(5) == 3


def test_program_pair_inputs_line_up_with_the_completion_tokens():
  """The program's per-pair inputs on world pairs: token-shaped ones cover exactly the completion
  tokens (the PairBatch's masks), padding pairs included; values as the world and the diff give them."""
  w = world.World(world.WorldConfig(seed=0))
  prompts = w.prompts(6, seed=1)
  rng = np.random.default_rng(0)
  comp = lambda: np.append(rng.integers(4, 32, size=int(rng.integers(1, 9))), world.EOS).astype(np.int32)
  src = [
    {"prompt": p, "chosen": comp(), "rejected": comp(), "score_chosen": 1.0, "score_rejected": 0.0, "example_id": i}
    for i, p in enumerate(prompts)
  ]
  spec = types.SimpleNamespace(requires=frozenset({"diff_masks", "embeddings", "segments", "turn_ids"}))
  fn = main_lib._pair_inputs_fn(types.SimpleNamespace(world=w), spec)
  batch = _loader(src, pair_inputs=fn, drop_remainder=False).batch_at(1)  # 2 real pairs, 2 padding
  pairs = batch["pairs"]
  for side in ("chosen", "rejected"):
    mask = np.asarray(getattr(pairs, f"{side}_mask")) > 0
    np.testing.assert_array_equal(batch[f"{side}_segment_ids"] >= 0, mask)
    np.testing.assert_array_equal(batch[f"{side}_turn_ids"], batch[f"{side}_segment_ids"])  # segments as turns
    assert not np.any(batch[f"{side}_diff_mask"][~mask])
    assert batch[f"{side}_segment_scores"].shape == (4, w.num_segments(main_lib.SEGMENT_LEN), 2)
  for i, e in enumerate(src[4:]):
    mc, mr = pofx.losses.bmc_modified_tokens(e["chosen"], e["rejected"])
    np.testing.assert_array_equal(batch["chosen_diff_mask"][i, : mc.size], mc)
    np.testing.assert_array_equal(batch["rejected_diff_mask"][i, : mr.size], mr)
    np.testing.assert_allclose(batch["prompt_embeddings"][i], w.embed_prompt(e["prompt"]))
    np.testing.assert_allclose(batch["chosen_embeddings"][i], w.embed_completion(e["chosen"]))
    np.testing.assert_allclose(batch["rejected_segment_scores"][i], w.segment_scores(e["prompt"], e["rejected"])[1])
  assert not batch["prompt_embeddings"][2:].any() and (batch["chosen_segment_ids"][2:] == -1).all()


# -------------------------------------------------------------------------------------------------
# Config checks and the program
# -------------------------------------------------------------------------------------------------


def _with(c, **fields):
  with c.unlocked():
    for dotted, value in fields.items():
      main_lib._set(c, dotted.replace("__", "."), value)
  return c


@pytest.mark.parametrize(
  "loss,fields,message",
  [
    ("kto", {"train__reference__kind": "cached"}, "reference log-probs of its KL batch"),
    ("bmc", {"train__reference__kind": "multi"}, "per-token reference log-probs"),
    ("kto", {"train__parallel__mode": "shard_map"}, "single-device step only"),
    ("kto", {"train__batch_size": 2, "train__grad_accum_steps": 2}, "at least 2 pairs per micro-batch"),
  ],
)
def test_configs_refuse_what_the_inputs_cannot_be_built_for(loss, fields, message):
  fields = {"train__reference__kind": "frozen", **fields}
  c = _with(_config("new_methods"), sweep=(), train__loss=loss, train__loss_hyper={"beta": 0.1}, **fields)
  with pytest.raises(ValueError, match=message):
    validate.validate(c)


def test_gdpo_needs_a_reference_that_runs_a_forward():
  # GDPO reads the reference's per-state EOS log-probs at temperature gamma: no cache holds them.
  c = _with(_config("new_methods"), sweep=(), train__loss="gdpo", train__loss_hyper={"gamma": 0.5})
  validate.validate(_with(c, train__reference__kind="frozen"))
  for kind in ("cached", "multi"):
    with pytest.raises(ValueError, match=f"reference.kind='{kind}'.*per-state EOS log-probs.*allowed: 'frozen'"):
      validate.validate(_with(c, train__reference__kind=kind))
  with pytest.raises(ValueError, match="per-state EOS log-probs, which a cached reference does not hold"):
    pofx.train.validate("gdpo", pofx.references.cached("f", "f"))
  # the program builds the log-prob function with the world's EOS and the loss's gamma
  run = types.SimpleNamespace(config=c, tokenizer=None)
  kw = main_lib._eos_kwargs(run, pofx.losses.spec("gdpo"), {"gamma": 0.5})
  assert kw == {"eos_id": pofx.world.EOS, "eos_temperature": 0.5}
  assert main_lib._eos_kwargs(run, pofx.losses.spec("gdpo"), {})["eos_temperature"] == 0.1
  assert main_lib._eos_kwargs(run, pofx.losses.spec("dpo"), {}) == {}


def test_dmpo_runs_on_world_data_with_segments_as_turns():
  c = _with(_config("new_methods"), sweep=(), train__loss="dmpo", train__loss_hyper={"beta": 0.1})
  c = _with(c, train__reference__kind="frozen")
  validate.validate(c)  # refused before the program made turn ids
  with pytest.raises(ValueError, match="per-token reference log-probs"):
    validate.validate(_with(c, train__reference__kind="cached"))


def test_world_annotations_need_world_data():
  c = _with(_config("dpo_files"), train__loss="sem_dpo", train__loss_hyper={"alpha": 1.0})
  with pytest.raises(ValueError, match="data.source='files'.*'embeddings'.*allowed: data.source='world'"):
    validate.validate(c)
