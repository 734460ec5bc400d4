"""The loops (`experiments/loops.py`): the RLHF estimator by hand, the round buffers, the loop
configs' validation, every loop config at `:tiny` from the session's SFT base and data (`seed_dir`),
and a run killed (SIGKILL) in round 2 that resumes to the uninterrupted run's parameters, buffers
and summary.

One module-scoped fixture runs them: the killed run and its resumption as a user runs them
(subprocesses of `python -m experiments.main`: `--fault` kills the process), every loop config in
the test process (`experiments.loops.run`, the function the program hands a loop config to: the
process's imports and traced programs are shared), while the killed run's subprocess works on the
other core. The kill test's uninterrupted run is the iterative config's run."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import validate
from experiments import loops, provenance
from experiments import main as main_lib
from pofx import pair_construction
from tests.program import ROOT, _config, _final_params, _main, _seed_from

FAMILIES = ("iterative_dpo", "online_dpo", "dice", "spin", "rlhf")
KILL_STEP = 3  # :tiny loops: 2 rounds of 2 steps; step 3 is in round 2, after round 1's checkpoint


def test_rl_advantages_by_hand():
  r = np.array([1.0, 2.0, 3.0, 6.0], np.float32)
  # RLOO, K = 2: each sample against the other of its prompt.
  np.testing.assert_allclose(loops.rl_advantages(r, estimator="rloo", group_size=2), [-1.0, 1.0, -3.0, 3.0])
  # RLOO, K = 4: R_i - (12 - R_i) / 3.
  want = [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3]
  np.testing.assert_allclose(loops.rl_advantages(r, estimator="rloo", group_size=4), want, rtol=1e-6)
  np.testing.assert_allclose(loops.rl_advantages(r, estimator="reinforce", group_size=4, baseline=2.5), r - 2.5)
  with pytest.raises(ValueError, match="K >= 2"):
    loops.rl_advantages(r, estimator="rloo", group_size=3)


def test_round_buffer_round_trips_and_its_digest_is_checked(tmp_path):
  pairs = pair_construction.Pairs(
    prompt=[np.array([1, 5, 2], np.int32), np.array([1, 6, 7, 2], np.int32)],
    chosen=[np.array([4, 3], np.int32), np.array([8, 8, 3], np.int32)],
    rejected=[np.array([5, 5, 5, 3], np.int32), np.array([9, 3], np.int32)],
    chosen_score=np.array([0.5, 1.5], np.float32),
    rejected_score=np.array([0.0, -1.0], np.float32),
    prompt_id=np.array([0, 1], np.int32),
    num_identical=2,
  )
  path = str(tmp_path / "round_0000.npz")
  digest = loops.save_buffer(path, pairs)
  back = loops.load_buffer(path, digest)
  for name in ("prompt", "chosen", "rejected"):
    assert [x.tolist() for x in getattr(back, name)] == [x.tolist() for x in getattr(pairs, name)]
  np.testing.assert_array_equal(back.chosen_score, pairs.chosen_score)
  assert back.num_identical == 2
  with open(path, "r+b") as f:
    f.seek(100)
    f.write(b"\xff")
  with pytest.raises(ValueError, match="does not match the SHA-256"):
    loops.load_buffer(path, digest)


class _Program:
  """The one thing `loops._check_record` asks of the program: where its notes go."""

  said = []

  @staticmethod
  def _say(msg, *args):
    _Program.said.append(msg % args)


def _edited(family, **edits):
  c = _config(family, "tiny")
  with c.unlocked():
    for field, value in edits.items():
      *parents, last = field.split("__")
      node = c
      for p in parents:
        node = node[p]
      node[last] = value
  return c


def test_a_loop_workdir_of_another_config_is_refused_or_overwritten(tmp_path):
  work = str(tmp_path)
  loops._check_record(_Program, _config("iterative_dpo", "tiny"), work, False)
  (tmp_path / "summary.json").write_text("{}")
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)  # the step of round 2's end (2 steps a round)
  other = _edited("iterative_dpo", loop__replay=0.25)
  with pytest.raises(provenance.Refused, match=r"another config \(differs: loop.replay\); use a new --workdir"):
    loops._check_record(_Program, other, work, False)
  assert (tmp_path / "summary.json").exists()
  # More rounds continue the run (its outputs are kept); fewer than it reached are refused.
  loops._check_record(_Program, _edited("iterative_dpo", loop__rounds=3), work, False)
  assert (tmp_path / "summary.json").exists()
  with pytest.raises(provenance.Refused, match=r"reached round 2, more than config.loop.rounds=1"):
    loops._check_record(_Program, _edited("iterative_dpo", loop__rounds=1), work, False)
  loops._check_record(_Program, other, work, True)
  assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints").exists()
  assert "removed the loop outputs" in _Program.said[-1]
  loops._check_record(_Program, other, work, False)  # now the workdir's own config


@pytest.mark.parametrize("family", FAMILIES)
def test_loop_configs_build_locked_and_valid(family):
  for arg in ("", "tiny"):
    c = _config(family, arg)
    validate.validate(c)
    assert c.is_locked and c.loop.kind != "offline"
  with pytest.raises(ValueError, match="allowed"):
    _config(family, "no_such_arg")


@pytest.mark.parametrize(
  "edits,message",
  [
    ({"loop.labeller": "judge"}, r"config.loop.labeller='judge' is not allowed; allowed: \['gold', 'implicit'"),
    ({"loop.replay": 1.0}, r"config.loop.replay=1.0 is not allowed; allowed: a fraction in \[0, 1\)"),
    ({"loop.samples_per_prompt": 1}, "samples_per_prompt=1 is not allowed with loop.labeller='gold'"),
    ({"loop.labeller": "implicit"}, "needs config.loop.offline_first=True"),
    ({"train.loss": "kto"}, r"reads \['kl'\], which a loop's pairs do not carry"),
    ({"data.source": "files"}, "needs the controlled world"),
  ],
)
def test_bad_loop_configs_are_refused_with_what_is_allowed(edits, message):
  c = _config("iterative_dpo", "tiny")
  with c.unlocked():
    for field, value in edits.items():
      *parents, last = field.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[last] = value
  with pytest.raises(ValueError, match=message):
    validate._check_loop(c)


@pytest.fixture(scope="module")
def loop_runs(seed_dir, tmp_path_factory):
  """Every loop config at :tiny, in this process (`loops.run`, what `experiments.main` hands a loop
  config to; its stderr captured), while the iterative one killed after step KILL_STEP runs as a
  subprocess of the program; then the killed run resumed by the program. Returns {name: (workdir,
  CompletedProcess-like)}: the in-process runs have return code 0 and their stderr."""
  root = tmp_path_factory.mktemp("loops")
  env = {**os.environ, "PYTHONPATH": ROOT}
  for name in (*FAMILIES, "killed"):
    _seed_from(seed_dir, root / name)
  killed_args = ["--config=configs/iterative_dpo.py:tiny", f"--workdir={root / 'killed'}", "--noprogress"]
  killed = subprocess.Popen(
    [sys.executable, "-m", "experiments.main", *killed_args, f"--fault=step:{KILL_STEP}"],
    cwd=ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  out = {}
  for name in FAMILIES:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      loops.run(main_lib, _config(name, "tiny"), str(root / name), progress=False)
    out[name] = (root / name, subprocess.CompletedProcess([name], 0, "", err.getvalue()))
  stdout, stderr = killed.communicate(timeout=600)
  out["killed"] = (root / "killed", subprocess.CompletedProcess(killed.args, killed.returncode, stdout, stderr))
  out["resumed"] = (root / "killed", _main(killed_args))
  return out


def _round_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("[pofx] loop: round ")]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_loop_config_trains_on_tiny_and_reports_every_round(loop_runs, family):
  work, out = loop_runs[family]
  assert out.returncode == 0, out.stderr[-3000:]
  c = _config(family, "tiny")
  lp = c.loop
  s = json.load(open(work / "summary.json"))
  # The gold evaluation of the language pipeline: reward, win rate against the base, KL to it.
  for key in ("gold_reward_policy", "gold_reward_base", "win_rate_vs_base", "kl_to_base"):
    assert np.isfinite(s[key]), key
  assert s["loop"] == lp.kind and s["loop_steps"] == lp.rounds * lp.steps_per_round
  rounds = s["loop_rounds"]
  assert [r["round"] for r in rounds] == list(range(lp.rounds))
  k = lp.samples_per_prompt
  for r in rounds:
    assert r["train_steps"] == lp.steps_per_round
    if r.get("offline"):  # DICE's round 0: DPO on the stage-2 pairs
      assert r["samples"] == 0 and r["pairs"] > 0
      continue
    per_round = lp.prompts_per_round * (lp.steps_per_round if lp.kind == "rlhf" else 1)
    assert r["samples"] == per_round * k
    assert r["labels"] == per_round * (k + (lp.labeller == "self_play"))
    if lp.kind != "rlhf":
      assert 0 < r["pairs"] <= lp.prompts_per_round
  if family == "dice":
    assert rounds[1]["replay_per_batch"] == round(lp.replay * c.train.batch_size)
    assert 0.0 <= rounds[1]["length_alpha"] < 1.0
  lines = _round_lines(out.stderr)
  assert len(lines) == lp.rounds and f"round {lp.rounds}/{lp.rounds}: " in lines[-1]
  assert f"{rounds[-1]['samples']} samples, {rounds[-1]['labels']} labels" in lines[-1]
  recs = [json.loads(x) for x in open(work / "metrics.jsonl")]
  assert [r["step"] for r in recs if r["stage"] == "loop_round"] == list(range(1, lp.rounds + 1))


def test_killed_in_round_2_resumes_to_the_uninterrupted_run(loop_runs):
  straight, done = loop_runs["iterative_dpo"]
  killed, first = loop_runs["killed"]
  _, resumed = loop_runs["resumed"]
  assert done.returncode == 0, done.stderr[-3000:]
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  assert len(_round_lines(first.stderr)) == 1 and "summary:" not in first.stdout  # killed in round 2
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "[pofx] loop: resumed at round 1 (step 2)" in resumed.stderr
  a, b = _final_params(straight), _final_params(killed)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
  names = sorted(os.listdir(straight / loops.BUFFERS))
  assert names == sorted(os.listdir(killed / loops.BUFFERS)) == ["round_0000.npz", "round_0001.npz"]
  for name in names:
    assert (straight / loops.BUFFERS / name).read_bytes() == (killed / loops.BUFFERS / name).read_bytes()
  s1, s2 = (json.load(open(w / "summary.json")) for w in (straight, killed))
  drop = set(loops.WALL_CLOCK) | {"startup"}
  assert {k: v for k, v in s1.items() if k not in drop} == {k: v for k, v in s2.items() if k not in drop}
  logged = [
    [(r["stage"], r["step"]) for r in map(json.loads, open(w / "metrics.jsonl")) if r["stage"].startswith("loop")]
    for w in (straight, killed)
  ]
  assert sorted(logged[1]) == sorted(logged[0])  # redone steps are not logged twice
