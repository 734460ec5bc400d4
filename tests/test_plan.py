"""experiments.plan: parameter counts, per-device bytes by the sharding rules, FLOPs, bad meshes.

Expected values are written out here: the published parameter counts of the Llama checkpoints
(checked by hand against the closed form, see `_closed_form`), per-device shapes of every leaf
worked out by hand from the rules of `pofx.parallel` (sharded dimension / axis size, replicated
leaves whole), and XLA's own argument sizes of the step compiled on 8 simulated CPU devices.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from configs import dpo, validate
from experiments import plan
from pofx.models import llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Published sizes: Llama 3.2 1B (tied embeddings), Llama 3.1 8B and 70B (untied).
PUBLISHED = {"llama3_1b": 1_235_814_400, "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496}


def _closed_form(V, D, n, H, K, hd, F, tied):
  """Parameters written out: embedding (+ head), per block q,o [D, H hd], k,v [D, K hd], gate,
  up [D, F], down [F, D], two norms [D]; final norm [D].
  By hand: 8B: block = 2*4096*4096 + 2*4096*1024 + 3*4096*14336 + 2*4096 = 218,112,000;
  32 blocks + 2*128256*4096 + 4096 = 8,030,261,248. 70B: block = 855,654,400; 80 blocks +
  2*128256*8192 + 8192 = 70,553,706,496. 1B: block = 60,821,504; 16 blocks + 128256*2048 + 2048
  = 1,235,814,400."""
  block = 2 * D * H * hd + 2 * D * K * hd + 3 * D * F + 2 * D
  return V * D * (1 if tied else 2) + n * block + D


def _plan(arg, mesh=None, **kw):
  c = dpo.get_config(arg)
  return plan.make_plan(c, mesh, compile=False, config_name=f"configs/dpo.py:{arg}", **kw)


# ------------------------------------------------------------------------------------------------
# Configs and presets.


@pytest.mark.parametrize("arg", ["llama3_1b", "llama3_8b", "llama3_70b"])
def test_pod_configs_validate_and_name_the_preset(arg):
  c = dpo.get_config(arg)
  validate.validate(c)
  assert c.model.preset == arg and c.train.parallel.mode == "jit" and c.model.dtype == "bfloat16"
  shape = plan.parse_mesh(c.train.parallel.mesh)
  assert c.train.batch_size % (shape["data"] * shape["fsdp"]) == 0
  assert c.data.completion_bucket < c.data.seq_bucket


def test_presets_have_the_published_shapes():
  for name, (D, n, H, F) in {"llama3_8b": (4096, 32, 32, 14336), "llama3_70b": (8192, 80, 64, 28672)}.items():
    cfg = llama.preset(name)
    assert (
      cfg.vocab_size,
      cfg.hidden_size,
      cfg.num_layers,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.mlp_size,
      cfg.resolved_head_dim,
    ) == (128256, D, n, H, 8, F, 128)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == (8.0, 1.0, 4.0, 8192)
    assert not cfg.tie_embeddings and cfg.dtype == "bfloat16" and cfg.rms_norm_eps == 1e-5
  assert llama.preset("llama3_1b") == llama.preset("llama_3_2_1b") == llama.preset("1b")
  assert llama.preset("llama3_8b") == llama.preset("llama_3_1_8b")
  assert llama.preset("llama3_70b") == llama.preset("llama_3_1_70b")


@pytest.mark.parametrize(
  "arg,shape",
  [
    ("llama3_1b", (128256, 2048, 16, 32, 8, 64, 8192, True)),
    ("llama3_8b", (128256, 4096, 32, 32, 8, 128, 14336, False)),
    ("llama3_70b", (128256, 8192, 80, 64, 8, 128, 28672, False)),
  ],
)
def test_plan_param_count_is_closed_form_and_published(arg, shape):
  p = _plan(arg)
  assert p["model"]["num_params"] == llama.preset(arg).num_params() == _closed_form(*shape) == PUBLISHED[arg]
  assert p["flops"]["source"] == "analytic" and "no-compile" in p["flops"]["note"]


# ------------------------------------------------------------------------------------------------
# Per-device bytes, leaf by leaf, by hand.


def _bench_config():
  c = dpo.get_config("tiny")
  with c.unlocked():
    c.model.preset = "bench"
  return c


def _leaves(p, prefix):
  return {r["path"][len(prefix) :]: r for r in p["leaves"] if r["path"].startswith(prefix)}


def test_bench_params_per_device_by_hand_default_rules_2x4():
  """bench (V 4096, D 256, 4 layers, 8 heads x 32, 4 KV heads, MLP 688) on data=2 x fsdp=4, the
  default rule (FSDP: the largest dimension divisible by fsdp=4, leaves of >= 2^16 elements)."""
  p = plan.make_plan(_bench_config(), "2x4", compile=False)
  by_hand = {"embed/embedding": (1024, 256), "lm_head": (256, 1024), "norm/scale": (256,)}
  for i in range(4):
    l = f"layers_{i}/"
    by_hand.update(
      {
        l + "attn/q_proj/kernel": (64, 256),  # 256 x 256 = 65,536 elements: sharded, first dim on a tie
        l + "attn/o_proj/kernel": (64, 256),
        l + "attn/k_proj/kernel": (256, 128),  # 32,768 < 2^16: replicated
        l + "attn/v_proj/kernel": (256, 128),
        l + "mlp/gate_proj/kernel": (256, 172),  # 688 / 4
        l + "mlp/up_proj/kernel": (256, 172),
        l + "mlp/down_proj/kernel": (172, 256),
        l + "input_norm/scale": (256,),
        l + "post_attn_norm/scale": (256,),
      }
    )
  params = _leaves(p, "params/")
  assert set(params) == set(by_hand)
  for path, local in by_hand.items():
    assert params[path]["bytes_per_device"] == 4 * math.prod(local), path
  expected = 4 * sum(math.prod(s) for s in by_hand.values())
  assert p["memory_per_device"]["parameters"] == expected == p["memory_per_device"]["gradients"]
  assert expected < 4 * llama.bench().num_params()  # something is sharded
  # AdamW: two float32 moments with the parameters' specs, plus two int32 step counters.
  mu = {k.split("/mu/", 1)[1]: r for k, r in _leaves(p, "opt_state/").items() if "/mu/" in k}
  assert {k: r["bytes_per_device"] for k, r in mu.items()} == {k: 4 * math.prod(s) for k, s in by_hand.items()}
  assert p["memory_per_device"]["optimizer_state"] == 2 * expected + 2 * 4
  # The cached reference: 2 float32 per pair, the 8 pairs split over data x fsdp = 8 devices.
  assert p["memory_per_device"]["reference"] == 2 * 4 * 8 // 8


def test_bench_llama_rules_with_tensor_axis_by_hand():
  """LLAMA_RULES on data=2 x fsdp=2 x tensor=2: column-parallel q/k/v/gate/up P(fsdp, tensor),
  row-parallel o/down P(tensor, fsdp), embedding P(tensor, fsdp), head P(fsdp, tensor); the
  norms fall to the FSDP rule (256 elements < 2^16: replicated)."""
  p = plan.make_plan(_bench_config(), "2x2x2", compile=False)
  assert p["rules"] == "llama"
  params = _leaves(p, "params/")
  by_hand = {
    "embed/embedding": (2048, 128),
    "lm_head": (128, 2048),
    "norm/scale": (256,),
    "layers_0/attn/q_proj/kernel": (128, 128),
    "layers_0/attn/k_proj/kernel": (128, 64),
    "layers_0/attn/o_proj/kernel": (128, 128),
    "layers_0/mlp/gate_proj/kernel": (128, 344),
    "layers_0/mlp/down_proj/kernel": (344, 128),
    "layers_0/input_norm/scale": (256,),
  }
  for path, local in by_hand.items():
    assert params[path]["bytes_per_device"] == 4 * math.prod(local), path


def test_8b_on_16x4_by_hand():
  """Every matrix of the 8B model divides by fsdp=4 (sharded), the 65 norm scales [4096] are
  replicated; the data axis replicates (pure data parallelism)."""
  p = _plan("llama3_8b", "16x4")
  norms = 65 * 4096
  params = 4 * ((8_030_261_248 - norms) // 4 + norms)
  mem = p["memory_per_device"]
  assert mem["parameters"] == params == mem["gradients"] == 8_031_059_968
  assert mem["optimizer_state"] == 2 * params + 8
  assert mem["reference"] == 2 * 4 * 128 // 64
  assert p["batch"]["tokens_per_device"] == 128 * 4096 / 64


def test_activation_estimate_by_hand():
  """The formula of the module docstring for one small case, written out."""
  m = llama.LlamaConfig(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, mlp_size=48)
  shapes = plan.Shapes("prompt_shared", pairs=8, rows=8, length=16, completion=4, accum=1)
  mesh = {"data": 2, "fsdp": 2}
  tokens = 8 * 16 / 4
  full = 4 * (4 * 32 + 2 * 4 * 8 + 2 * 2 * 8 + 3 * 48) + 4 * 16 * (4 + 4)
  a = plan.activation_estimate(m, shapes, mesh, chunk=1024)
  hidden, head = 2 * 2 * 4 * 32 * 4, 2 * 4 * 64 * 100
  assert a["bytes_per_device"] == int(tokens * 3 * full + hidden + head)
  r = plan.activation_estimate(m.replace(remat=True), shapes, mesh, chunk=1024)
  assert r["bytes_per_device"] == int(tokens * (3 * 4 * 32 + full) + hidden + head)


def test_analytic_flops_blocks_term_is_six_n_tokens():
  """3 x blocks forward = 6 x (matmul parameters of the blocks) x tokens, the parameters taken
  from the closed form minus embedding, head and norms."""
  c = dpo.get_config("llama3_8b")
  m = plan.model_config_of(c)
  shapes = plan.batch_shapes(c)
  f = plan.analytic_flops(m, shapes, reference_kind="cached")
  n_blocks = m.num_params() - 2 * 128256 * 4096 - 4096 * (2 * 32 + 1)
  tokens = 128 * 4096
  assert f["six_n_tokens"] == 6 * n_blocks * tokens == 3 * f["blocks_forward"]
  assert f["attention_forward"] == 4 * 32 * 128 * 4096**2 * 4096
  assert f["head_forward"] == 2 * 4096 * 128256 * 2 * 128 * 1024
  frozen = plan.analytic_flops(m, shapes, reference_kind="frozen")
  assert frozen["flops"] == f["flops"] + f["forward"]
  # Perturbations repeat the policy's forward-backward (the cached reference adds nothing):
  # SAM/AWP once more, RWP once per proxy ascent.
  policy = f["flops"]
  assert plan.analytic_flops(m, shapes, perturbation_kind="awp")["flops"] == 2 * policy
  assert plan.analytic_flops(m, shapes, perturbation_kind="rwp", rwp_steps=10)["flops"] == 11 * policy
  assert plan.analytic_flops(m, shapes, perturbation_kind="rwp", rwp_steps=3)["flops"] == 4 * policy


# ------------------------------------------------------------------------------------------------
# The command line, compiled on 8 simulated devices (one run shared by the tests below).


def _cli(*args, timeout=300):
  # The program adds the device count for its compile child; the suite's XLA flags
  # (tests/conftest.py) stay.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run(
    [sys.executable, "-m", "experiments.plan", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


@pytest.fixture(scope="module")
def tiny_compiled(tmp_path_factory):
  path = tmp_path_factory.mktemp("plan") / "plan.json"
  proc = _cli("--config=configs/dpo.py:tiny", "--mesh=2x4", "--min_fsdp_size=1", "--compile", f"--json={path}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(path.read_text()), proc.stdout


def test_cli_prints_a_table(tiny_compiled):
  _, out = tiny_compiled
  for text in (
    "parameters",
    "optimizer state",
    "gradients",
    "activations (estimate)",
    "FLOPs/step (compiled)",
    "78,144 parameters",
  ):
    assert text in out, text


def test_compiled_flops_agree_with_analytic(tiny_compiled):
  """XLA's count (matmuls plus every elementwise op, the optimizer and the loss) against the
  matmul-only formula: within a factor 1.5 for the tiny model (measured 1.12; 0.94 for the 1B
  model with L=512)."""
  p, _ = tiny_compiled
  fl = p["flops"]
  assert fl["source"] == "compiled" and fl["compiled"]["devices"] == 8
  assert fl["per_step"] == pytest.approx(8 * fl["compiled"]["flops_per_device"])
  ratio = fl["compiled"]["flops"] / fl["analytic"]["flops"]
  assert 1 / 1.5 < ratio < 1.5, ratio


def test_compiled_argument_bytes_equal_the_planned_bytes(tiny_compiled):
  """XLA partitions the step itself: its per-device argument bytes (state + batch + key, with
  min_fsdp_size=1 so that every divisible leaf is sharded) equal the plan's rule-by-rule sum."""
  p, _ = tiny_compiled
  assert p["flops"]["compiled"]["argument_bytes_per_device"] == p["argument_bytes_per_device"]
  assert p["memory_per_device"]["parameters"] < 4 * p["model"]["num_params"]


def test_bad_mesh_strings_fail_clearly():
  for bad in ["", "16", "16x", "x4", "0x4", "4x0", "4x-1", "axb", "2x2x2x2", "4*2", 8]:
    with pytest.raises(ValueError, match="mesh"):
      plan.parse_mesh(bad)
  assert plan.parse_mesh("16x4") == {"data": 16, "fsdp": 4}
  assert plan.parse_mesh(" 8 x 4 x 2 ") == {"data": 8, "fsdp": 4, "tensor": 2}
  with pytest.raises(ValueError, match="not divisible"):
    _plan("llama3_8b", "3x4")  # 128 pairs over 12 devices
  with pytest.raises(ValueError, match="no mesh"):
    _plan("tiny")


def test_cli_bad_mesh_exits_with_the_message():
  proc = _cli("--config=configs/dpo.py:llama3_8b", "--mesh=16by4", "--no-compile")
  assert proc.returncode != 0
  assert "--mesh='16by4' is not a mesh" in proc.stderr and "<data>x<fsdp>" in proc.stderr
