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

from pofx import batching, lora, models, perturbations, policy, references, train

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
  want = MODEL.logits(lora.apply(params, adapters, spec), tokens, positions, segments)
  np.testing.assert_allclose(hf_logits(loaded).numpy(), np.asarray(want), atol=2e-5, rtol=1e-5)
  base_gap = np.max(np.abs(np.asarray(want) - np.asarray(MODEL.logits(params, tokens, positions, segments))))
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
  got = MODEL.logits(lora.apply(params, got_adapters, got_spec), tokens, positions, segments)
  np.testing.assert_allclose(np.asarray(got), hf_logits(peft_model).numpy(), atol=2e-5, rtol=1e-5)
  # merge == peft's merge_and_unload
  merged = lora.merge(params, got_adapters, got_spec)
  w = peft_model.merge_and_unload().model.layers[1].mlp.up_proj.weight.detach().numpy()
  np.testing.assert_allclose(np.asarray(merged["layers_1"]["mlp"]["up_proj"]["kernel"]).T, w, atol=1e-6)


def test_program_trains_lora_with_adapters_off_reference(seed_dir, tmp_path):
  """`python -m experiments.main` at :tiny with LoRA and reference adapters_off, from the session's
  SFT base: the final params and the checkpoints hold the adapters only, the PEFT directory loads
  back to them, and the trained adapters moved B away from 0."""
  from configs import validate
  from experiments import lora_io
  from tests.program import _config, _final_params, _main, _seed_from

  work = tmp_path / "lora"
  _seed_from(seed_dir, work)  # the SFT base, the data and the kernel-backend record
  flags = ["--config.train.lora.enabled=True", "--config.train.reference.kind=adapters_off"]
  flags += ["--config.train.lora.rank=2", "--config.train.lora.targets=q_proj,v_proj,down_proj"]
  out = _main(["--config=configs/dpo.py:tiny", f"--workdir={work}", "--noprogress", *flags])
  assert out.returncode == 0, out.stderr[-3000:]
  final = _final_params(work)
  assert set(final) == {"layers_0", "layers_1"} and set(final["layers_0"]["attn"]) == {"q_proj", "v_proj"}
  adapters, spec = lora_io.load_adapters(str(work / "adapters"), 2)
  assert (spec.rank, spec.targets) == (2, ("down_proj", "q_proj", "v_proj"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), adapters, final)
  assert np.max(np.abs(final["layers_1"]["mlp"]["down_proj"]["b"])) > 0
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
