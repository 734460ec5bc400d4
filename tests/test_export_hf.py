"""The export program, run as a user would: the session's SFT base of configs/dpo.py:tiny (the
`seed_dir` fixture) written as a Hugging Face folder that transformers loads with pofx's logits.

pofx's side is computed here from the orbax parameters and the world's model (not through the
program or `pofx.models.hf`); float32 on both sides, so 1e-4 absolute (as in
tests/models/test_families.py).
"""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import export_hf
from pofx import models
from pofx import world as world_lib
from tests import forked
from tests.program import _config


def test_export_program_writes_a_folder_transformers_loads(seed_dir, tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  out = tmp_path / "hf"
  args = ["--config=configs/dpo.py:tiny", f"--workdir={seed_dir}", "--params=sft_params", f"--out={out}"]
  run = forked.run_module("experiments.export_hf", args)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "as a 'llama' model" in run.stdout
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]

  c = _config("dpo")
  world = world_lib.World(world_lib.WorldConfig(seed=c.seed, **dict(c.world)))
  config = world.model_config()
  like = jax.eval_shape(lambda k: models.init_params(config, k), jax.random.key(0))
  params = ocp.StandardCheckpointer().restore(os.path.join(seed_dir, "sft_params"), like)
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
  pos = np.broadcast_to(np.arange(12), (2, 12))
  want = np.asarray(jax.jit(models.make(config).logits)(params, tokens, pos, np.ones((2, 12), np.int32)))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").float().eval()
  with torch.no_grad():
    got = hf_model(input_ids=torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  # A workdir without those parameters: refused before anything is written (the program prints
  # the error in one line and exits with 2).
  with pytest.raises(ValueError, match="no parameters at .*final_params"):
    export_hf.export(c, str(seed_dir), str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()
