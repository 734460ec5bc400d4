"""LoRA (pofx.lora): the adapted forward against a by-hand numpy weight W + (alpha/r) B A, the
zero-B start equal to the base, gradients and optimizer state on the adapters only, the
adapters_off reference equal to the base model, merge/unmerge, and the PEFT round trip (peft
loads pofx's adapters, pofx loads peft's, logits compared with transformers)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pofx import batching, kernels, lora, models, perturbations, policy, references, train

CONFIG = models.preset("tiny")
MODEL = models.make(CONFIG)
LOGPS_FN = policy.make_logps_fn(MODEL.apply, MODEL.head, chunk_size=64)
LOGITS = jax.jit(MODEL.logits)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def base():
  return MODEL.init(jax.random.key(0))


def _tokens(seed=0, B=2, L=12):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CONFIG.vocab_size, (B, L)).astype(np.int32)
  return jnp.asarray(tokens), jnp.asarray(np.tile(np.arange(L), (B, 1))), jnp.ones((B, L), jnp.int32)


def _random_adapters(spec, seed=1):
  """Adapters with non-zero a and b drawn in numpy (as `pofx.lora.init`'s tree: a [in, r], b [r, out])."""
  rng = np.random.default_rng(seed)
  shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32)}
  shapes.update({"gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)})
  out = {}
  for i in range(CONFIG.num_layers):
    for t in spec.targets:
      group = "attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
      fi, fo = shapes[t]
      out.setdefault(f"layers_{i}", {}).setdefault(group, {})[t] = {
        "a": rng.normal(0, 0.2, (fi, spec.rank)).astype(np.float32),
        "b": rng.normal(0, 0.2, (spec.rank, fo)).astype(np.float32),
      }
  return out


def test_zero_b_equals_base_exactly(base):
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL)
  adapters = lora.init(base, spec, jax.random.key(3))
  a = adapters["layers_1"]["mlp"]["down_proj"]["a"]
  assert a.shape == (64, 4) and float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(64) and float(jnp.std(a)) > 0
  assert all(
    float(jnp.max(jnp.abs(m["b"]))) == 0.0 for g in adapters.values() for ms in g.values() for m in ms.values()
  )
  x = _tokens()
  np.testing.assert_array_equal(LOGITS(lora.apply(base, adapters, spec), *x), LOGITS(base, *x))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_is_base_plus_scaled_BA_by_hand(base, dtype):
  """pofx's adapted model against the same model with weights edited in numpy in Hugging Face's
  [out, in] layout: W_hf + (alpha / r) B A, with B = b^T, A = a^T (arXiv:2106.09685, Eq. 3)."""
  spec = lora.LoraSpec(rank=3, alpha=5.0, targets=("q_proj", "v_proj", "up_proj", "down_proj"))
  adapters = _random_adapters(spec)
  by_hand = jax.tree.map(np.asarray, base)
  for layer, groups in adapters.items():
    for group, mods in groups.items():
      for t, ab in mods.items():
        w_hf = np.asarray(base[layer][group][t]["kernel"], np.float64).T
        B, A = ab["b"].astype(np.float64).T, ab["a"].astype(np.float64).T
        by_hand[layer][group][t]["kernel"] = (w_hf + (5.0 / 3) * B @ A).T.astype(np.float32)
  logits = jax.jit(models.make(CONFIG.replace(dtype=dtype)).logits)
  x = _tokens(1)
  got = logits(lora.apply(base, jax.tree.map(jnp.asarray, adapters), spec), *x)
  want = logits(jax.tree.map(jnp.asarray, by_hand), *x)
  tol = 1e-5 if dtype == "float32" else 0.0
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol)
  assert float(jnp.max(jnp.abs(got - logits(base, *x)))) > 1e-3  # the adapters matter


def test_merge_then_unmerge_restores_base(base):
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=ALL)
  adapters = jax.tree.map(jnp.asarray, _random_adapters(spec, 2))
  merged = lora.merge(base, adapters, spec)
  w, w0 = merged["layers_0"]["attn"]["k_proj"]["kernel"], base["layers_0"]["attn"]["k_proj"]["kernel"]
  ab = adapters["layers_0"]["attn"]["k_proj"]
  np.testing.assert_allclose(w, np.asarray(w0) + 2.0 * np.asarray(ab["a"]) @ np.asarray(ab["b"]), atol=1e-6)
  back = lora.unmerge(merged, adapters, spec)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=0), back, base)
  assert merged["embed"]["embedding"] is base["embed"]["embedding"]  # untargeted leaves untouched
  # Adapters for some blocks only (PEFT's layers_to_transform): the other blocks stay the base's.
  partial = lora.merge(base, {"layers_1": adapters["layers_1"]}, spec)
  assert partial["layers_0"] is base["layers_0"]
  np.testing.assert_array_equal(
    partial["layers_1"]["mlp"]["up_proj"]["kernel"], merged["layers_1"]["mlp"]["up_proj"]["kernel"]
  )


def _pairs(seed=0, n=6):
  rng = np.random.default_rng(seed)
  prompts, chosen, rejected = [], [], []
  for _ in range(n):
    p = rng.integers(1, CONFIG.vocab_size, rng.integers(3, 7)).astype(np.int32)
    prompts.append(p)
    chosen.append(((p[-1] + 1 + np.arange(rng.integers(3, 8))) % CONFIG.vocab_size).astype(np.int32))
    rejected.append(rng.integers(1, CONFIG.vocab_size, rng.integers(3, 8)).astype(np.int32))
  return {"pairs": batching.prompt_shared(prompts, chosen, rejected, seq_bucket=8, completion_bucket=8)}


def _lora_logps(spec):
  return lambda frozen_and_adapters, batch: LOGPS_FN(lora.apply(*frozen_and_adapters, spec), batch)


def test_step_trains_adapters_only_and_adapters_off_is_the_base(base):
  """Three DPO steps: the base in the state is bit-identical, Adam's moments exist for the adapters
  only, and adapters_off's reference log-probs are the base model's. (SAM over the adapters: the
  LoRA runs of tests/parallel_check.py.)"""
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL)
  adapters = lora.init(base, spec, jax.random.key(1))
  batch = _pairs()
  opt = optax.adam(1e-2)
  ref = references.adapters_off(LOGPS_FN)
  pert = perturbations.none()
  with pytest.raises(ValueError, match="combine"):
    train.make_train_step(LOGPS_FN, opt, reference=ref)
  snapshot = jax.tree.map(np.array, base)
  state = train.init_state(adapters, opt, ref, pert, frozen=base)
  combine = lambda f, a: lora.apply(f, a, spec)
  step = train.make_train_step(LOGPS_FN, opt, reference=ref, perturbation=pert, combine=combine)
  for i in range(3):
    state, m = step(state, batch, jax.random.key(i))
  assert float(m["nonfinite"]) == 0.0
  # The state holds the caller's base arrays themselves (no copy), still valid (never donated).
  assert all(x is y for x, y in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(base)))
  jax.tree.map(np.testing.assert_array_equal, state.frozen, snapshot)
  moments = {x.shape for x in jax.tree.leaves(state.opt_state) if np.ndim(x) >= 1}
  assert moments == {x.shape for x in jax.tree.leaves(adapters)}, moments
  assert float(jnp.max(jnp.abs(state.params["layers_0"]["attn"]["q_proj"]["b"]))) > 0  # b left zero
  got = jax.jit(ref.logps)((state.frozen, state.ref_state), batch)
  want = jax.jit(LOGPS_FN)(base, batch)
  np.testing.assert_array_equal(got.chosen, want.chosen)
  np.testing.assert_array_equal(got.rejected, want.rejected)
  policy_now = jax.jit(LOGPS_FN)(combine(state.frozen, state.params), batch)
  assert float(jnp.max(jnp.abs(policy_now.chosen - want.chosen))) > 1e-4


def test_ema_over_adapters_reads_the_shared_base(base):
  """over_frozen(ema): the reference state is a copy of the adapters, updated as
  decay * ref + (1 - decay) * policy, and its log-probs are those of base + the EMA adapters."""
  spec = lora.LoraSpec(rank=2, alpha=2.0, targets=("q_proj",))
  old = jax.tree.map(jnp.asarray, _random_adapters(spec, 4))
  new = jax.tree.map(jnp.asarray, _random_adapters(spec, 5))
  ref = references.over_frozen(references.ema(0.75, _lora_logps(spec)))
  assert ref.reads_frozen and ref.updates
  ref_state = ref.update(ref.init(old), new, 1)
  mixed = jax.tree.map(lambda o, n: 0.75 * np.asarray(o) + 0.25 * np.asarray(n), old, new)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ref_state, mixed)
  batch = _pairs(1)
  got = jax.jit(ref.logps)((base, ref_state), batch)
  want = jax.jit(LOGPS_FN)(lora.apply(base, jax.tree.map(jnp.asarray, mixed), spec), batch)
  np.testing.assert_allclose(got.chosen, want.chosen, atol=1e-5)
  with pytest.raises(ValueError, match="over the adapters"):
    references.over_frozen(references.adapters_off(LOGPS_FN))


def test_spec_refuses_bad_values():
  with pytest.raises(ValueError, match="rank"):
    lora.LoraSpec(rank=0)
  with pytest.raises(ValueError, match="targets"):
    lora.LoraSpec(targets=("qkv",))
  with pytest.raises(ValueError, match="dropout"):
    lora.LoraSpec(dropout=1.0)
  with pytest.raises(ValueError, match="use_dora"):
    lora.spec_from_peft({"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "use_dora": True})


def test_peft_round_trip(tmp_path):
  """pofx-saved adapters load into peft (`PeftModel.from_pretrained` on a transformers Llama of the
  tiny shape) with the same logits as pofx; peft's own adapters (random B) load into pofx likewise."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  from experiments import lora_io

  cfg = CONFIG
  hf_cfg = transformers.LlamaConfig(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    intermediate_size=cfg.mlp_size,
    head_dim=cfg.resolved_head_dim,
    rms_norm_eps=cfg.rms_norm_eps,
    rope_theta=cfg.rope_theta,
    tie_word_embeddings=cfg.tie_embeddings,
    max_position_embeddings=64,
    attn_implementation="eager",
  )
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  hf_state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  params = models.params_from_hf({k: v.numpy() for k, v in hf_state.items()}, cfg)
  tokens, positions, segments = _tokens(2)

  def hf_logits(m):
    with torch.no_grad():
      return m(input_ids=torch.tensor(np.asarray(tokens)), position_ids=torch.tensor(np.asarray(positions))).logits

  # pofx -> peft.
  spec = lora.LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"))
  adapters = jax.tree.map(jnp.asarray, _random_adapters(spec, 5))
  lora_io.save_adapters(str(tmp_path / "pofx"), adapters, spec)
  assert json.loads((tmp_path / "pofx" / "adapter_config.json").read_text())["r"] == 4
  loaded = peft.PeftModel.from_pretrained(hf, str(tmp_path / "pofx")).eval()
  want = LOGITS(lora.apply(params, adapters, spec), tokens, positions, segments)
  np.testing.assert_allclose(hf_logits(loaded).numpy(), np.asarray(want), atol=2e-5, rtol=1e-5)
  base_gap = np.max(np.abs(np.asarray(want) - np.asarray(LOGITS(params, tokens, positions, segments))))
  assert base_gap > 1e-2

  # peft -> pofx: peft's LoraConfig/get_peft_model with a random B, saved by peft.
  hf2 = transformers.LlamaForCausalLM(hf_cfg).float().eval()
  hf2.load_state_dict(hf_state)
  config = peft.LoraConfig(
    r=3, lora_alpha=6, target_modules=["v_proj", "up_proj"], lora_dropout=0.0, init_lora_weights=False
  )
  peft_model = peft.get_peft_model(hf2, config).eval()
  peft_model.save_pretrained(str(tmp_path / "peft"))
  got_adapters, got_spec = lora_io.load_adapters(str(tmp_path / "peft"), cfg.num_layers)
  assert (got_spec.rank, got_spec.alpha, got_spec.targets) == (3, 6.0, ("up_proj", "v_proj"))
  got = LOGITS(lora.apply(params, got_adapters, got_spec), tokens, positions, segments)
  np.testing.assert_allclose(np.asarray(got), hf_logits(peft_model).numpy(), atol=2e-5, rtol=1e-5)
  # merge == peft's merge_and_unload
  merged = lora.merge(params, got_adapters, got_spec)
  w = peft_model.merge_and_unload().model.layers[1].mlp.up_proj.weight.detach().numpy()
  np.testing.assert_allclose(np.asarray(merged["layers_1"]["mlp"]["up_proj"]["kernel"]).T, w, atol=1e-6)


def test_program_trains_lora_with_adapters_off_reference_and_dropout(seed_dir, tmp_path):
  """`python -m experiments.main` at :tiny with LoRA (`train.lora.dropout=0.1`) and reference
  adapters_off, from the session's SFT base: it trains (finite losses, B moved away from 0, KL to
  the base finite and positive), the final params and the checkpoints hold the adapters only, the
  PEFT directory loads back to them and records the rank, targets and dropout rate; validation
  refuses adapters_off without LoRA, a frozen reference with it, an unknown target and a dropout
  rate of 1. (Without dropout the step folds the adapters into the kernels instead: the step
  tests above train both forms.)"""
  from configs import validate
  from experiments import lora_io
  from tests.program import _config, _final_params, _main, _seed_from

  work = tmp_path / "lora"
  _seed_from(seed_dir, work)  # the SFT base, the data and the kernel-backend record
  flags = ["--config.train.lora.enabled=True", "--config.train.reference.kind=adapters_off"]
  flags += ["--config.train.lora.rank=2", "--config.train.lora.targets=q_proj,v_proj,down_proj"]
  flags += ["--config.train.lora.dropout=0.1"]
  out = _main(["--config=configs/dpo.py:tiny", f"--workdir={work}", "--noprogress", *flags])
  assert out.returncode == 0, out.stderr[-3000:]
  final = _final_params(work)
  assert set(final) == {"layers_0", "layers_1"} and set(final["layers_0"]["attn"]) == {"q_proj", "v_proj"}
  adapters, spec = lora_io.load_adapters(str(work / "adapters"), 2)
  assert (spec.rank, spec.targets) == (2, ("down_proj", "q_proj", "v_proj"))
  assert spec.dropout == pytest.approx(0.1)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), adapters, final)
  assert np.max(np.abs(final["layers_1"]["mlp"]["down_proj"]["b"])) > 0
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  losses = [r["loss"] for r in rows if r.get("stage") == "train" and "loss" in r]
  assert losses and all(np.isfinite(losses))
  summary = json.load(open(work / "summary.json"))
  assert np.isfinite(summary["kl_to_base"]) and summary["kl_to_base"] > 0
  c = _config("dpo", "tiny")
  c.train.reference.kind = "adapters_off"
  with pytest.raises(ValueError, match="train.lora.enabled=True"):
    validate.validate(c)
  c.train.lora.enabled, c.train.reference.kind = True, "frozen"
  with pytest.raises(ValueError, match="second copy"):
    validate.validate(c)
  c.train.reference.kind, c.train.lora.targets = "adapters_off", "q_proj,qkv"
  with pytest.raises(ValueError, match="lora.targets"):
    validate.validate(c)
  c.train.lora.targets, c.train.lora.dropout = "q_proj", 1.0
  with pytest.raises(ValueError, match=r"train.lora.dropout=1.0 is not allowed; allowed: a number in \[0, 1\)"):
    validate.validate(c)


# LoRA dropout: the branch form x W0 + dropout(x) a (alpha/r) b ---------------------------------


def _branch_params(seed, fan_in=6, fan_out=5, rank=3):
  rng = np.random.default_rng(seed)
  w0 = rng.normal(0, 0.5, (fan_in, fan_out)).astype(np.float32)
  a = rng.normal(0, 0.5, (fan_in, rank)).astype(np.float32)
  b = rng.normal(0, 0.5, (rank, fan_out)).astype(np.float32)
  x = rng.normal(0, 1.0, (7, fan_in)).astype(np.float32)
  return w0, a, b, x


def _branch_leaf(w0, a, b, alpha, rate):
  """A projection's parameters in the branch form, through `pofx.lora.apply` on a one-layer tree."""
  spec = lora.LoraSpec(rank=a.shape[1], alpha=alpha, targets=("q_proj",), dropout=rate)
  base = {"layers_0": {"attn": {"q_proj": {"kernel": jnp.asarray(w0)}}}}
  adapters = {"layers_0": {"attn": {"q_proj": {"a": jnp.asarray(a), "b": jnp.asarray(b)}}}}
  return lora.apply(base, adapters, spec)["layers_0"]["attn"]["q_proj"]


def test_dropout_branch_equals_numpy_with_the_same_mask():
  """The adapted projection with dropout p: `x W0 + (alpha/r) (m * x / (1 - p)) A^T B^T` by hand in
  float64, in PEFT's [out, in] layout, with the mask m drawn from the documented key
  (`jax.random.bernoulli(key, 1 - p, x.shape)`); without a key, the same without dropout."""
  from pofx.models import llama

  w0, a, b, x = _branch_params(0)
  alpha, p = 6.0, 0.4
  leaf = _branch_leaf(w0, a, b, alpha, p)
  assert set(leaf) == {"kernel", "lora_a", "lora_b", "lora_dropout"}
  key = jax.random.key(7)
  mask = np.asarray(jax.random.bernoulli(key, 1.0 - p, x.shape), np.float64)
  assert 0 < mask.mean() < 1
  W0, A, B = w0.astype(np.float64).T, a.astype(np.float64).T, b.astype(np.float64).T  # [out, in], [r, in], [out, r]
  x64 = x.astype(np.float64)
  want = x64 @ W0.T + (alpha / 3) * ((mask * x64 / (1 - p)) @ A.T @ B.T)
  got = llama.projection(jnp.asarray(x), leaf, jnp.float32, kernels.XLA, key)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  no_drop = x64 @ W0.T + (alpha / 3) * (x64 @ A.T @ B.T)
  np.testing.assert_allclose(
    np.asarray(llama.projection(jnp.asarray(x), leaf, jnp.float32, kernels.XLA)), no_drop, rtol=1e-5, atol=1e-5
  )
  assert np.max(np.abs(want - no_drop)) > 1e-2  # the mask matters
  # The model's keys: each projection of a block folds its own index into the block's key.
  k_q, k_v = llama.lora_dropout_key(key, "q_proj"), llama.lora_dropout_key(key, "v_proj")
  assert not np.array_equal(jax.random.key_data(k_q), jax.random.key_data(k_v))


def test_dropout_gradients_reach_a_and_b_only():
  """With a fixed mask m, `L = sum(G * y)` has dL/da = (alpha/r) x~^T G b^T and dL/db = (alpha/r)
  (x~ a)^T G, x~ = m x / (1 - p) (by hand). That the base gets none in training (it is the
  step's frozen part) is checked on the train step below."""
  from pofx.models import llama

  w0, a, b, x = _branch_params(1)
  alpha, p, key = 4.0, 0.3, jax.random.key(3)
  G = np.random.default_rng(2).normal(0, 1, (7, 5))

  def loss(w0_, a_, b_):
    leaf = _branch_leaf(w0_, a_, b_, alpha, p)
    return jnp.sum(jnp.asarray(G, jnp.float32) * llama.projection(jnp.asarray(x), leaf, jnp.float32, kernels.XLA, key))

  ga, gb = jax.grad(loss, argnums=(1, 2))(jnp.asarray(w0), jnp.asarray(a), jnp.asarray(b))
  xt = np.asarray(jax.random.bernoulli(key, 1.0 - p, x.shape), np.float64) * x / (1 - p)
  s = alpha / 3
  np.testing.assert_allclose(np.asarray(ga), s * xt.T @ G @ b.T.astype(np.float64), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gb), s * (xt @ a).T @ G, rtol=1e-4, atol=1e-5)


def test_train_step_with_lora_dropout(base):
  """Two KTO steps (its KL pairs scored by the step) with LoRA dropout 0.5 (one mask per step,
  `dropout_samples=1`): finite, the base in the state bit-identical, Adam's moments the adapters'
  only, every adapter leaf moved. (KTO's KL pairs: the policy there is base + adapters and the
  adapters_off reference reads the base from the state.)"""
  ref = references.adapters_off(LOGPS_FN)
  opt = optax.adam(1e-2)
  spec = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "up_proj"), dropout=0.5)
  start = _random_adapters(spec, 6)
  snapshot = jax.tree.map(np.array, base)
  state = train.init_state(jax.tree.map(jnp.asarray, start), opt, ref, perturbations.none(), frozen=base, loss="kto")
  step = train.make_train_step(
    LOGPS_FN, opt, loss="kto", reference=ref, combine=lambda f, a: lora.apply(f, a, spec), dropout_samples=1
  )
  batch = {**_pairs(2), "kl": _pairs(3)}
  for i in range(2):
    state, m = step(state, batch, jax.random.key(10 + i))
    assert float(m["nonfinite"]) == 0.0 and np.isfinite(float(m["loss"]))
  jax.tree.map(np.testing.assert_array_equal, state.frozen, snapshot)
  moments = {x.shape for x in jax.tree.leaves(state.opt_state) if np.ndim(x) >= 1}
  assert moments == {x.shape for x in jax.tree.leaves(start)}, moments
  moved = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - y))), state.params, start)
  assert min(jax.tree.leaves(moved)) > 0


def test_branch_form_without_key_equals_folded(base):
  """The branch form (dropout > 0) without a dropout key is the folded model up to float32
  rounding; a dropout key changes it and the same key reproduces it; with rate 0 (folded) a
  dropout key changes nothing, bit for bit."""
  targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  spec0 = lora.LoraSpec(rank=3, alpha=5.0, targets=targets)
  spec = lora.LoraSpec(rank=3, alpha=5.0, targets=targets, dropout=0.2)
  adapters = jax.tree.map(jnp.asarray, _random_adapters(spec, 7))
  folded_params = lora.apply(base, adapters, spec0)
  assert set(folded_params["layers_0"]["mlp"]["up_proj"]) == {"kernel"}
  x = _tokens(3)
  hidden = jax.jit(lambda p: MODEL.apply(p, *x))
  hidden_key = jax.jit(lambda p, k: MODEL.apply(p, *x, dropout_key=k))
  folded = hidden(folded_params)
  branch = lora.apply(base, adapters, spec)
  np.testing.assert_allclose(np.asarray(hidden(branch)), np.asarray(folded), atol=2e-5, rtol=1e-5)
  k = jax.random.key(4)
  dropped = hidden_key(branch, k)
  assert float(jnp.max(jnp.abs(dropped - folded))) > 1e-2
  np.testing.assert_array_equal(dropped, hidden_key(branch, k))
  np.testing.assert_array_equal(hidden_key(folded_params, k), folded)


def test_dropout_branch_matches_peft_lora_layer():
  """pofx's adapted projection against peft's `LoraLayer` forward on a torch Linear in training
  mode, with peft's `lora_dropout` module replaced by the same mask (m x / (1 - p))."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  from pofx.models import llama

  w0, a, b, x = _branch_params(3, fan_in=8, fan_out=6, rank=4)
  alpha, p, key = 8.0, 0.25, jax.random.key(11)
  mask = np.asarray(jax.random.bernoulli(key, 1.0 - p, x.shape), np.float32)

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.proj = torch.nn.Linear(8, 6, bias=False)

  class FixedMask(torch.nn.Module):
    def forward(self, t):
      return t * torch.tensor(mask) / (1 - p)

  net = Net()
  with torch.no_grad():
    net.proj.weight.copy_(torch.tensor(w0.T))
  model = peft.get_peft_model(net, peft.LoraConfig(r=4, lora_alpha=alpha, target_modules=["proj"], lora_dropout=p))
  layer = model.base_model.model.proj
  with torch.no_grad():
    layer.lora_A["default"].weight.copy_(torch.tensor(a.T))
    layer.lora_B["default"].weight.copy_(torch.tensor(b.T))
  layer.lora_dropout["default"] = FixedMask()
  model.train()
  with torch.no_grad():
    want = layer(torch.tensor(x)).numpy()
  got = llama.projection(jnp.asarray(x), _branch_leaf(w0, a, b, alpha, p), jnp.float32, kernels.XLA, key)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
