"""The Colab tutorials under `colab/` run top to bottom, and what they compute is right.

The notebooks are committed with their outputs (so that a repository viewer shows the plots); the
checks here make sure those outputs are present, small and free of errors, and re-execute every
notebook: each is parsed as nbformat v4 JSON and its code cells are executed in one namespace
(shell `!` and `%` magic lines become `pass`, so the install cell installs nothing), with
matplotlib's Agg backend. No cell may raise. Afterwards, values the notebook computed are compared
with independent closed forms written out here (the worked example's losses by hand, the Wilson
interval formula, the gold reward formula of `pofx.world`'s docstring, ...).

After changing a notebook, or the library under it, refresh the committed outputs with
`python tests/test_colab.py` (needs `pip install nbclient ipykernel`): it runs every notebook in a
Jupyter kernel from its own directory, top to bottom, and writes it back with its outputs.
"""

import glob
import json
import math
import os
import pathlib
import re
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
MAGIC = re.compile(r"^(\s*)[!%]")


def _load(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _source(cell):
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def _python(src):
  """A code cell's source with IPython shell/magic lines replaced by `pass` (indentation kept);
  a cell magic (`%%...` on the first line) skips the whole cell."""
  if src.lstrip().startswith("%%"):
    return ""
  return "\n".join(MAGIC.sub(r"\1pass  # ", line) if MAGIC.match(line) else line for line in src.split("\n"))


def _execute(path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  ns = {"__name__": "__main__"}
  code_cells = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*non-interactive.*")  # plt.show() under Agg
    for i, cell in enumerate(code_cells):
      src = _python(_source(cell))
      try:
        exec(compile(src, f"{os.path.basename(path)}[code cell {i}]", "exec"), ns)  # pylint: disable=exec-used
      except Exception as e:  # any failure names the notebook and the cell
        raise AssertionError(f"{os.path.basename(path)}: code cell {i} raised {type(e).__name__}: {e}\n{src}") from e
      finally:
        plt.close("all")
  return ns


# -------------------------------------------------------------------------------------------------
# Independent values.


def _softplus(x):
  return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# The worked example of the loss tests (`tests/losses/worked.py`): pi_w=-10, pi_l=-12, ref_w=ref_l=-11,
# beta=0.1, |y_w|=5, |y_l|=6, so rho = 2 and beta * rho = 0.2; each value below is worked out by hand.
_H = 0.2
_GOLDEN = {
  "dpo": 0.598139,
  "gpo": 0.598139,  # log(1 + e^{-0.2})
  "slic": 0.8,  # max(0, 1 - 0.2)
  "exponential": 0.818731,  # e^{-0.2}
  "truncated_quadratic": 0.64,  # max(0, 0.8)^2
  "savage": 0.202649,  # sigmoid(-0.2)^2
  "ipo_sum": 9.0,  # (2 - 1/(2*0.1))^2
  "ipo": 21.467778,  # (1/5 - (-1/6) - 5)^2, length-averaged
  "ln_dpo": 0.674982,  # -log sigmoid(0.1 * (1/5 + 1/6))
  "cdpo": -(0.9) * -_softplus(-_H) - 0.1 * -_softplus(_H),  # eps = 0.1
  "simpo": _softplus(-(2.0 * (0.0 - 0.25))),  # beta 2, gamma/beta 0.25, avg margin 0
  "cpo": _softplus(-0.1 * 2.0) + 10.0 / 5.0,  # log(1 + e^{-0.2}) + 10/5 = 2.598139
}

# f(0), f'(0), f''(0) of the six GPO functions, differentiated by hand (GPO, arXiv:2402.05749, Table 1).
_DERIVS = {
  "logistic": (math.log(2), -0.5, 0.25),
  "hinge": (1, -1, 0),
  "squared": (1, -2, 2),
  "exponential": (1, -1, 1),
  "truncated_quadratic": (1, -2, 2),
  "savage": (0.25, -0.25, 0.125),
}


def _modified_huber(v):
  v = np.asarray(v, np.float64)
  return np.where(v >= -1.0, np.maximum(0.0, 1.0 - v) ** 2, -4.0 * v)


def _check_gpo_losses(ns):
  for name, (f0, d1, d2) in _DERIVS.items():
    np.testing.assert_allclose(ns["derivs"][name], (f0, d1, d2), rtol=1e-6, atol=1e-6, err_msg=name)
  assert len(ns["values"]) >= 20
  for name, expected in _GOLDEN.items():
    np.testing.assert_allclose(ns["values"][name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
  # The batch loss of DPO is the mean of log(1 + e^{-beta rho}) over the three pairs.
  pol_w = [sum(r) for r in ns["policy_w"]]
  pol_l = [sum(r) for r in ns["policy_l"]]
  ref_w = [sum(r) for r in ns["ref_w"]]
  ref_l = [sum(r) for r in ns["ref_l"]]
  rho = [(a - b) - (c - d) for a, b, c, d in zip(pol_w, ref_w, pol_l, ref_l)]
  assert rho[0] == pytest.approx(2.0, abs=1e-5)
  np.testing.assert_allclose(ns["batch_values"]["dpo"], np.mean([_softplus(-0.1 * r) for r in rho]), rtol=1e-5)
  np.testing.assert_allclose(ns["grad_chosen"], [-0.1 * _sigmoid(-0.1 * r) / 3 for r in rho], rtol=1e-5)
  # The custom loss: Zhang's modified Huber at beta * rho.
  np.testing.assert_allclose(ns["huber_values"], _modified_huber([0.1 * r for r in rho]), rtol=1e-5, atol=1e-6)
  # Matched betas: beta_f * f''(0)/|f'(0)| = 0.1 * 0.25/0.5 = 0.05.
  expected_beta = {
    "logistic": 0.1,
    "squared": 0.05,
    "exponential": 0.05,
    "truncated_quadratic": 0.05,
    "savage": 0.1,
    "modified_huber": 0.05,
  }
  assert set(ns["matched_beta"]) == set(expected_beta)
  for name, b in expected_beta.items():
    assert ns["matched_beta"][name] == pytest.approx(b, rel=1e-5), name
  # ... and the normalised losses follow -rho + 0.025 rho^2 near 0 (third-order differences).
  grid = np.asarray(ns["rho_grid"])
  near = np.abs(grid) <= 1.0
  for name, curve in ns["normalised"].items():
    np.testing.assert_allclose(curve[near], (-grid + 0.025 * grid**2)[near], atol=2e-3, err_msg=name)


def _check_train_step(ns):
  # The prompt-shared layout reproduces the log-probs of each completion scored on its own.
  np.testing.assert_allclose(ns["manual_chosen"], np.asarray(ns["shared"].chosen), atol=1e-4)
  np.testing.assert_allclose(ns["manual_rejected"], np.asarray(ns["shared"].rejected), atol=1e-4)
  np.testing.assert_allclose(np.asarray(ns["fused_out"].rejected), np.asarray(ns["shared"].rejected), atol=1e-4)
  runs = ns["histories"]
  assert set(runs) == {"frozen", "cached", "cached + SAM"}
  for name, hist in runs.items():
    assert len(hist) >= 20
    # Step 0: the policy is the reference, rho = 0, the DPO loss is log 2 (SAM reports the
    # loss at the unperturbed parameters).
    assert hist[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5), name
    assert hist[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6), name
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.1, name
    assert hist[-1]["rewards/margins"] > 0.2, name
    assert hist[-1]["rewards/accuracy"] >= 0.75, name
  # The cached reference is the frozen one computed once: same trajectory.
  frozen = [h["loss"] for h in runs["frozen"]]
  cached = [h["loss"] for h in runs["cached"]]
  np.testing.assert_allclose(cached, frozen, rtol=1e-4, atol=1e-5)
  assert "stale_cache_error" in ns and "fingerprint" in ns["stale_cache_error"]


def _wilson(p, n, z=1.959963984540054):
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def _gold_reward(w, prompt, completion):
  """r*(x, y) from pofx.world's docstring, for completions of content tokens (+ EOS)."""
  cfg = w.config
  x = np.asarray(prompt)
  x = x[x >= 4] - 4
  a = cfg.affinity_scale * w.affinity_table[x].sum(0) / math.sqrt(len(x))
  y = list(np.asarray(completion))
  finished = 3 in y
  body = np.asarray(y[: y.index(3)] if finished else y) - 4
  assert (body >= 0).all()
  n = len(body)
  r = float(np.mean(a[body])) if n else 0.0
  if n > 1:
    r += cfg.bigram_weight * float(np.mean([w.bigram_table[u, v] for u, v in zip(body[:-1], body[1:])]))
  r -= cfg.length_penalty * (max(0, cfg.min_good_len - n) + max(0, n - cfg.max_good_len))
  if not finished:
    r -= cfg.unfinished_penalty
  return r


def _check_controlled_world(ns):
  w = ns["w"]
  for y, r in zip(ns["example_completions"], ns["example_rewards"]):
    assert r == pytest.approx(_gold_reward(w, ns["example_prompt"], y), abs=1e-5)
  data = ns["data"]
  assert len(data) >= 256
  # Bradley-Terry labels: P(chosen > rejected) = sigmoid(label_scale * (r_w - r_l)) (no length bias).
  expected = 1.0 / (
    1.0
    + np.exp(-w.config.label_scale * (data.chosen_score.astype(np.float64) - data.rejected_score.astype(np.float64)))
  )
  np.testing.assert_allclose(data.label_prob, expected, rtol=1e-5, atol=1e-6)
  assert not any(w.is_eval_prompt(p) for p in data.prompt)
  assert all(w.is_eval_prompt(p) for p in ns["eval_prompts"])
  hist = ns["history"]
  assert hist[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
  assert all(math.isfinite(h["loss"]) for h in hist)
  ev = ns["policy_eval"]
  n = ev["num_comparisons"]
  assert n == len(ns["eval_prompts"]) * ns["eval_samples"]
  lo, hi = _wilson(ev["win_rate"], n)
  assert ev["win_rate_low"] == pytest.approx(lo, abs=1e-9) and ev["win_rate_high"] == pytest.approx(hi, abs=1e-9)
  assert math.isfinite(ev["kl"]) and math.isfinite(ev["gold_reward"])
  pairs = ns["pair_eval"]
  for k in ("reward_accuracy", "ranking_accuracy", "idealized_ranking_accuracy"):
    assert 0.0 <= pairs[k] <= 1.0
  # A fraction of n pairs is a multiple of 1/n.
  correct = pairs["reward_accuracy"] * pairs["num_pairs"]
  assert correct == pytest.approx(round(correct))
  summary = ns["summary"]
  from experiments import main as experiments_main

  assert set(experiments_main.SUMMARY_KEYS) <= set(summary)
  lo, hi = summary["win_rate_ci95"]
  assert lo <= summary["win_rate_vs_base"] <= hi
  assert summary["loss"] == "dpo" and summary["reference"] == "cached"


def _check_diffusion_dpo(ns):
  world = ns["world"]
  # The gold reward of pofx.diffusion.world's docstring: log softmax of the classifier's logits at
  # the prompt's class + 4 * ink, ink the mean of (x + 1) / 2.
  logits = np.asarray(world.logits(ns["first"]), np.float64)
  log_probs = (
    logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
  )
  ink = ((np.asarray(ns["first"], np.float64) + 1.0) / 2.0).reshape(10, -1).mean(1)
  np.testing.assert_allclose(ns["digit_rewards"], log_probs[np.arange(10), np.arange(10)] + 4.0 * ink, atol=1e-4)
  # Bradley-Terry labels: the higher-reward image is chosen with probability sigmoid(4 |r_a - r_b|);
  # the observed share is within 4 standard deviations of its expectation.
  gap = np.abs(np.asarray(ns["reward_a"], np.float64) - np.asarray(ns["reward_b"], np.float64))
  p = 1.0 / (1.0 + np.exp(-4.0 * gap))
  observed = np.sum(np.asarray(ns["reward_gap"]) > 0)
  assert abs(observed - p.sum()) <= 4.0 * math.sqrt(np.sum(p * (1 - p))) + 1
  # Step 0: the policy is the reference, so the Diffusion-DPO loss is log 2 and every margin 0 (up
  # to beta = 5000 times the float32 rounding of two separate forwards of the same weights).
  hist = ns["history"]
  assert hist[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-4)
  assert hist[0]["rewards/margins"] == pytest.approx(0.0, abs=5e-4)
  assert all(math.isfinite(h["loss"]) for h in hist)
  r = ns["result"]
  n = r["num_samples"]
  assert n == len(ns["eval_labels"])
  lo, hi = _wilson(r["win_rate_vs_base"], n)
  assert r["win_rate_ci95_low"] == pytest.approx(lo, abs=1e-9) and r["win_rate_ci95_high"] == pytest.approx(
    hi, abs=1e-9
  )
  assert r["wins"] + r["ties"] + r["losses"] == n
  assert r["win_rate_vs_base"] == pytest.approx((r["wins"] + 0.5 * r["ties"]) / n)
  # What the tutorial shows: the policy beats the base under the gold reward (its whole 95% interval
  # above one half, and a higher mean gold reward of the same-noise samples).
  assert r["win_rate_ci95_low"] > 0.5 and r["gold_reward_policy"] > r["gold_reward_base"]


def _check_smollm2_lora_dpo(ns):
  # The gold reward written again (regular-expression words, `str.find` for the key), applied to the
  # held-out answers the notebook printed: the base fail rate and both mean rewards follow from it.
  n_max, lam = ns["MAX_WORDS"], ns["LAMBDA"]

  def gold(text, key, finished):
    n = len(re.findall(r"\S+", text))
    named, short = text.lower().find(key) >= 0, bool(finished) and n <= n_max
    return float(named) + float(short) - lam * n, named and short

  keys = [r["key"] for r in ns["held_recs"]]
  base = [gold(t, k, f) for t, k, f in zip(ns["base_texts"], keys, ns["base_finished"])]
  pol = [gold(t, k, f) for t, k, f in zip(ns["policy_texts"], keys, ns["policy_finished"])]
  n = len(ns["held_recs"])
  assert len(base) == len(pol) == n == 8
  assert ns["base_fail_rate"] == pytest.approx(np.mean([not ok for _, ok in base]))
  assert ns["base_fail_rate"] >= 0.5  # the base does not answer in a few words by default
  np.testing.assert_allclose(ns["base_gold"], [g for g, _ in base], atol=1e-12)
  np.testing.assert_allclose(ns["policy_gold"], [g for g, _ in pol], atol=1e-12)
  bg, pg = np.array([g for g, _ in base]), np.array([g for g, _ in pol])
  win = ns["win"]
  assert (win.wins, win.ties) == (int(np.sum(pg > bg)), int(np.sum(pg == bg)))
  lo, hi = _wilson(win.rate, n)
  assert win.rate == pytest.approx((win.wins + 0.5 * win.ties) / n)
  assert win.low == pytest.approx(lo, abs=1e-9) and win.high == pytest.approx(hi, abs=1e-9)
  # DPO starts at log 2 (adapters with B = 0: the policy is the reference), and the adapters it
  # trained change some greedy answers.
  assert ns["history"][0]["loss"] == pytest.approx(math.log(2.0), abs=1e-5)
  assert any(b != p for b, p in zip(ns["base_texts"], ns["policy_texts"]))


CHECKS = {
  "01_gpo_losses.ipynb": _check_gpo_losses,
  "02_train_step.ipynb": _check_train_step,
  "03_controlled_world.ipynb": _check_controlled_world,
  "04_diffusion_dpo.ipynb": _check_diffusion_dpo,
  "05_smollm2_lora_dpo.ipynb": _check_smollm2_lora_dpo,
}


def test_every_tutorial_is_present_and_checked():
  assert sorted(os.path.basename(p) for p in NOTEBOOKS) == sorted(CHECKS)


MAX_NOTEBOOK_BYTES = 1_000_000


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_nbformat_v4_with_its_outputs(path):
  nb = _load(path)
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 4
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  ids = [c.get("id") for c in nb["cells"]]
  assert len(set(ids)) == len(ids)
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert set(kinds) <= {"markdown", "code"} and kinds[0] == "markdown"
  for cell in nb["cells"]:
    assert isinstance(cell["source"], (list, str)) and isinstance(cell["metadata"], dict)
  # Committed with the outputs of one clean run, top to bottom: every code cell executed in order,
  # no errors, at least one plot, and the file small enough for a repository viewer.
  code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
  assert [c["execution_count"] for c in code_cells] == list(range(1, len(code_cells) + 1)), "re-execute the notebook"
  outputs = [o for c in code_cells for o in c["outputs"]]
  assert not [o for o in outputs if o["output_type"] == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the committed outputs"
  assert os.path.getsize(path) < MAX_NOTEBOOK_BYTES
  # The first code cell is the install cell, and no other cell uses shell or magic lines.
  code = [_source(c) for c in code_cells]
  setup = code[0]
  assert "%pip install" in setup and "POFX_SOURCE" in setup and "setup.py" in setup
  for src in code[1:]:
    assert not any(MAGIC.match(line) for line in src.split("\n")), src
  # No placeholder address and no pointer outside the repository.
  text = json.dumps(nb)
  assert not re.search(r"YOUR-|example\.com|<[a-z-]*url>", text, re.IGNORECASE)
  # The markdown cites its sources.
  markdown = " ".join(_source(c) for c in nb["cells"] if c["cell_type"] == "markdown")
  assert re.search(r"arXiv:\d{4}\.\d{4,5}", markdown)


def _install_cell(path):
  return _python(_source([c for c in _load(path)["cells"] if c["cell_type"] == "code"][0]))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_install_cell_inside_the_checkout_keeps_its_pofx(path, monkeypatch):
  monkeypatch.chdir(os.path.join(ROOT, "colab"))
  monkeypatch.setattr(sys, "path", list(sys.path))
  ns = {}
  exec(compile(_install_cell(path), "install", "exec"), ns)  # pylint: disable=exec-used
  assert ns["checkout"] == pathlib.Path(ROOT).resolve()
  assert "requirement" not in ns  # this checkout's pofx and its dependencies import: nothing installed
  assert str(pathlib.Path(ROOT).resolve()) in sys.path  # its packages (pofx_backends, experiments, ...) too


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_install_cell_elsewhere_stops_with_one_line_naming_what_to_set(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv("POFX_SOURCE", raising=False)
  monkeypatch.setitem(sys.modules, "pofx", None)  # `import pofx` raises ImportError, as on a fresh Colab
  monkeypatch.setattr(sys, "path", list(sys.path))
  with pytest.raises(SystemExit) as stop:
    exec(compile(_install_cell(path), "install", "exec"), {})  # pylint: disable=exec-used
  message = str(stop.value)
  assert "\n" not in message and "POFX_SOURCE" in message
  # With POFX_SOURCE set the cell goes on to install it (the `%pip` line, a no-op here) instead of stopping.
  monkeypatch.setenv("POFX_SOURCE", "git+https://host/pofx.git")
  ns = {}
  with pytest.raises(ImportError):
    exec(compile(_install_cell(path), "install", "exec"), ns)  # pylint: disable=exec-used
  assert ns["requirement"] == "git+https://host/pofx.git"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_computes_the_right_values(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # whatever a notebook writes stays out of the repository
  ns = _execute(path)
  CHECKS[os.path.basename(path)](ns)


def test_magic_lines_become_pass_with_their_indentation():
  src = "try:\n  import pofx\nexcept ImportError:\n  %pip install -q x\n  !ls\nx = 1 % 2\n"
  out = _python(src)
  assert "  pass  # pip install -q x" in out and "  pass  # ls" in out and "x = 1 % 2" in out
  compile(out, "t", "exec")
  assert _python("%%bash\necho hi\n") == ""


def refresh_outputs(paths=NOTEBOOKS, timeout=900):
  """Executes each notebook in a fresh Jupyter kernel, in its directory, and writes its outputs back."""
  import nbclient  # only for refreshing the committed outputs, not for the tests
  import nbformat

  for path in paths:
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
      nb,
      timeout=timeout,
      kernel_name="python3",
      record_timing=False,
      resources={"metadata": {"path": os.path.dirname(path)}},
    ).execute()
    nbformat.write(nb, path)
    print(f"{os.path.relpath(path, ROOT)}: {os.path.getsize(path) / 1e3:.0f} kB")


if __name__ == "__main__":
  refresh_outputs([os.path.abspath(p) for p in sys.argv[1:]] or NOTEBOOKS)
