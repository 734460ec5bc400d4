"""Running the training program as a user would, for the tests of tests/test_experiments.py and
tests/test_reliability.py: `_main` (a subprocess of `python -m experiments.main`), `_seed_from`
(a workdir that shares the session's SFT base and data) and `_final_params`. The session-scoped
`seed_dir` fixture that builds that base is in tests/conftest.py."""

import importlib
import os
import shutil

import orbax.checkpoint as ocp

from tests import forked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = ("sft_params", "data", "kernels.json")


def _config(family, arg="tiny"):
  return importlib.import_module(f"configs.{family}").get_config(arg)


def _main(args, **kw):
  """`python -m experiments.main *args` in a child process (tests/forked.py: forked from a server
  that has imported the program's libraries; `fresh=True` for a new interpreter)."""
  return forked.run_module("experiments.main", args, env={**os.environ, "PYTHONPATH": ROOT}, **kw)


def _seed_from(src, dst, names=SHARED):
  """Share the seed's SFT base and data (symlinks) and its kernel-backend record (a copy), so a
  run trains and evaluates only."""
  os.makedirs(dst, exist_ok=True)
  for name in names:
    if name == "kernels.json":
      shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    else:
      os.symlink(os.path.join(src, name), os.path.join(dst, name))


def _final_params(work):
  return ocp.StandardCheckpointer().restore(os.path.join(work, "final_params"))
