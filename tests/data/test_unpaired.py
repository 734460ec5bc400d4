"""KTO on unpaired binary feedback: TRL's unpaired records (validation, mismatched partners, the
file pipeline), the world's labels, the loss against TRL's formula written in numpy, and
configs/kto_unpaired.py:tiny through the program's stages."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pofx
from pofx import data
from pofx.data import BadRecord, unpaired
from tests.data import example


def _write(path, recs):
  with open(path, "w") as f:
    for r in recs:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def test_records_are_validated_with_reasons():
  ok = unpaired.parse_unpaired({"prompt": "q", "completion": " a", "label": True}, group=3)
  assert (ok.kind, ok.prompt, ok.completion, ok.label, ok.group) == ("text", "q", " a", True, 3)
  chat = unpaired.parse_unpaired(
    {
      "prompt": [{"role": "user", "content": "q"}],
      "completion": [{"role": "assistant", "content": "a"}],
      "label": False,
    }
  )
  assert chat.kind == "chat" and chat.label is False
  ids = unpaired.parse_unpaired({"prompt_input_ids": [1, 5], "completion_input_ids": [6], "label": np.bool_(True)})
  assert ids.kind == "ids" and ids.label is True
  bad = [
    ({"prompt": "q", "completion": "a"}, "missing_field"),
    ({"prompt": "q", "completion": "a", "label": 1}, "wrong_type"),  # a number is not a label
    ({"prompt": "q", "completion": "a", "label": "true"}, "wrong_type"),
    ({"prompt": "q", "completion": 3, "label": True}, "wrong_type"),
    ({"prompt": " ", "completion": "a", "label": True}, "empty_prompt"),
    ({"prompt": "q", "completion": "", "label": False}, "empty_completion"),
  ]
  for rec, reason in bad:
    with pytest.raises(BadRecord) as e:
      unpaired.parse_unpaired(rec)
    assert e.value.reason == reason, rec
  # Read as paired data by mistake: one line saying which format to use.
  with pytest.raises(BadRecord, match="format='unpaired'"):
    data.parse_record({"prompt": "q", "completion": "a", "label": True})


def test_partners_skip_identical_completions():
  # Example i is paired with the next example (cyclically) whose completion differs from its own.
  assert unpaired.partners(["a", "a", "b", "c"]).tolist() == [2, 2, 3, 0]
  assert unpaired.partners([np.asarray([4, 3]), np.asarray([5, 3])]).tolist() == [1, 0]
  with pytest.raises(ValueError, match="at least 2 different completions"):
    unpaired.partners(["a", "a"])
  recs = unpaired.pair_records([[1, 4], [1, 5], [1, 6]], [[7, 3], [8, 3], [7, 3]], [True, False, True])
  assert [r["rejected"].tolist() for r in recs] == [[8, 3], [7, 3], [8, 3]]
  assert [(r["score_chosen"], r["score_rejected"]) for r in recs] == [(1.0, 0.0), (0.0, 1.0), (1.0, 0.0)]


def test_world_feedback_labels_by_the_gold_threshold():
  gold = np.asarray([[0.5, -1.0, 2.0], [0.0, 0.1, -0.2]])
  prompts = [np.asarray([1, 4, 2]), np.asarray([1, 5, 2])]
  comps = [[np.asarray([4 + k, 3]) for k in range(3)], [np.asarray([8 + k, 3]) for k in range(3)]]
  ps, cs, labels, t = unpaired.world_feedback(prompts, comps, gold)
  assert t == pytest.approx(0.05)  # the median of the six gold rewards
  assert labels.tolist() == [True, False, True, False, True, False]
  assert [c.tolist() for c in cs][:2] == [[4, 3], [5, 3]] and ps[3].tolist() == [1, 5, 2]
  _, _, labels, t = unpaired.world_feedback(prompts, comps, gold, threshold=0.4)
  assert t == 0.4 and labels.tolist() == [True, False, True, False, False, False]


def test_files_go_through_the_pipeline_with_partners(tmp_path):
  tok = data.Tokenizer.from_dir(example(""))
  recs = [
    {"prompt": "Question : What size is the lemon ? Answer :", "completion": " The lemon is small .", "label": True},
    {"prompt": "Question : What size is the frog ? Answer :", "completion": " The frog is big .", "label": False},
    '{"prompt": "broken',
    {"prompt": "Question : What colour is the frog ? Answer :", "completion": " The frog is green .", "label": True},
  ]
  path = _write(tmp_path / "u.jsonl", recs)
  with pytest.raises(data.DataError, match=r"u.jsonl:3: bad record \(malformed_json\)"):
    list(data.iter_examples([path], tokenizer=tok, format="unpaired"))
  stats = data.Stats()
  out = [f for _, f in data.iter_examples([path], tokenizer=tok, format="unpaired", on_bad_record="skip", stats=stats)]
  assert len(out) == 3 and dict(stats.skipped) == {"malformed_json": 1}
  enc = lambda s: tok.encode(s, add_special_tokens=False)
  # The second example's rejected slot is the third example's completion (mismatched, for z0).
  assert list(out[1]["rejected"])[: len(enc(" The frog is green ."))] == enc(" The frog is green .")
  assert [float(f["score_chosen"]) for f in out] == [1.0, 0.0, 1.0]
  assert [float(f["score_rejected"]) for f in out] == [0.0, 1.0, 1.0]
  # Parquet rows (numpy booleans) read the same.
  table = pa.Table.from_pylist([r for r in recs if isinstance(r, dict)])
  pq.write_table(table, str(tmp_path / "u.parquet"))
  again = [f for _, f in data.iter_examples([str(tmp_path / "u.parquet")], tokenizer=tok, format="unpaired")]
  assert [list(f["chosen"]) for f in again] == [list(f["chosen"]) for f in out]
  with pytest.raises(data.DataError, match="at least 2 different completions"):
    one = _write(tmp_path / "one.jsonl", recs[:1])
    list(data.iter_examples([one], tokenizer=tok, format="unpaired"))


def _trl_kto_unpaired(lr, lr_kl, labels, beta, lam_d, lam_u):
  """TRL KTOTrainer._compute_loss (loss_type="kto") on an unpaired batch, in numpy."""
  kl = max(np.mean(lr_kl), 0.0)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  chosen = 1.0 - sig(beta * (lr[labels] - kl))
  rejected = 1.0 - sig(beta * (kl - lr[~labels]))
  return np.mean(np.concatenate([lam_d * chosen, lam_u * rejected]))


@pytest.mark.parametrize("kl_shift", [-3.0, 2.0])  # z0 clamped at 0, and z0 > 0
def test_loss_equals_trls_formula(kl_shift):
  rng = np.random.default_rng(0)
  pol_c, ref_c = rng.normal(-20, 3, 6), rng.normal(-20, 3, 6)
  ref_k = rng.normal(-20, 3, 6)
  pol_k = ref_k + kl_shift + rng.normal(0, 0.5, 6)
  labels = np.asarray([True, False, True, True, False, False])
  policy = pofx.PairLogps(chosen=pol_c.astype(np.float32), rejected=pol_k.astype(np.float32))
  reference = pofx.PairLogps(chosen=ref_c.astype(np.float32), rejected=ref_k.astype(np.float32))
  kw = dict(beta=0.1, desirable_weight=1.33, undesirable_weight=0.8, chosen_scores=labels.astype(np.float32))
  got = pofx.losses.batch_loss("kto_unpaired", policy, reference, rejected_scores=np.zeros(6, np.float32), **kw)
  want = _trl_kto_unpaired(pol_c - ref_c, pol_k - ref_k, labels, 0.1, 1.33, 0.8)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  bad = pofx.losses.get("kto_unpaired")(policy, reference, **{**kw, "chosen_scores": np.full(6, 2.0, np.float32)})
  assert np.isnan(np.asarray(bad)).all()


def test_kto_unpaired_program_trains_on_world_feedback(seed_dir, tmp_path, capfd):
  """configs/kto_unpaired.py:tiny on the session's SFT base (its own data: the world's completions
  labelled by the gold threshold), through the program's stages in this process (`run_one`)."""
  from experiments import main as main_lib
  from tests.program import _config, _seed_from

  work = str(tmp_path / "kto")
  _seed_from(str(seed_dir), work, names=("sft_params", "kernels.json"))
  main_lib.run_one(_config("kto_unpaired"), work, progress=False)
  err = capfd.readouterr().err
  assert "sft: reusing" in err and "256 unpaired examples, 0.500 desirable" in err, err[-2000:]
  with open(os.path.join(work, "summary.json")) as f:
    s = json.load(f)
  assert s["loss"] == "kto_unpaired" and s["nonfinite_steps"] == 0 and np.isfinite(s["gold_reward_policy"])
  # The training split holds the examples with their labels as scores (1 desirable, 0 not).
  with open(os.path.join(work, "data", "pairs_meta.json")) as f:
    meta = json.load(f)
  src = data.data_source(meta["path"], "train")
  labels = np.asarray([float(src[i]["score_chosen"]) for i in range(len(src))])
  assert len(src) == 256 and set(labels.tolist()) == {0.0, 1.0} and labels.mean() == 0.5
