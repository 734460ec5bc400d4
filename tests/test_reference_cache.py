"""Reference log-prob caches on disk (experiments/reference_cache.py): a shared folder keyed by
fingerprint refuses stale or damaged entries; a run's own folder recomputes another
configuration's entry. The program's use of a shared folder by two runs is in
tests/test_experiments.py::test_cpu_kernels_run_equals_the_xla_run."""

import os

import numpy as np
import pytest

from experiments import reference_cache as rc

FP, OTHER = "a" * 64, "b" * 64


def _entry(n=5):
  return rc.Entry(
    np.arange(n), -np.linspace(1.0, 2.0, n, dtype=np.float32), -np.linspace(3.0, 4.0, n, dtype=np.float32)
  )


def test_written_entry_reads_back_under_its_fingerprint(tmp_path):
  path = rc.shared_path(str(tmp_path / "cache"), FP)
  assert path == str(tmp_path / "cache" / f"{FP}.npz")
  assert rc.read(path, FP, shared=True) is None  # nothing there yet
  rc.write(path, _entry(), FP)
  got = rc.read(path, FP, shared=True)
  np.testing.assert_array_equal(got.example_id, np.arange(5))
  np.testing.assert_array_equal(got.chosen, -np.linspace(1.0, 2.0, 5, dtype=np.float32))
  np.testing.assert_array_equal(got.rejected, -np.linspace(3.0, 4.0, 5, dtype=np.float32))
  assert sorted(os.listdir(tmp_path / "cache")) == [f"{FP}.npz"]  # no partial file left behind


def test_shared_entry_holding_another_fingerprint_is_an_error(tmp_path):
  path = rc.shared_path(str(tmp_path), FP)
  rc.write(path, _entry(), OTHER)  # e.g. a file copied over the entry
  with pytest.raises(ValueError, match=r"holds log-probs for fingerprint bbbbbbbbbbbb\.\.\., not the aaaaaaaaaaaa"):
    rc.read(path, FP, shared=True)
  # In a run's own folder the same file is an earlier configuration's entry: recomputed.
  assert rc.read(path, FP, shared=False) is None


@pytest.mark.parametrize(
  "damage, match",
  [
    ("truncate", "is not a readable entry"),
    ("lengths", "must be equal 1-D shapes"),
    ("nan", "non-finite log-probs"),
  ],
)
def test_damaged_entries_are_errors_naming_the_file(tmp_path, damage, match):
  path = rc.shared_path(str(tmp_path), FP)
  if damage == "truncate":
    rc.write(path, _entry(), FP)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
  elif damage == "lengths":
    e = _entry()
    rc.write(path, rc.Entry(e.example_id, e.chosen[:3], e.rejected), FP)
  else:
    e = _entry()
    rc.write(path, rc.Entry(e.example_id, e.chosen, np.full(5, np.nan, np.float32)), FP)
  with pytest.raises(ValueError, match=match) as err:
    rc.read(path, FP, shared=True)
  assert path in str(err.value)


def test_a_failed_write_leaves_the_previous_entry(tmp_path):
  path = rc.shared_path(str(tmp_path), FP)
  rc.write(path, _entry(), FP)
  with pytest.raises(TypeError):
    rc.write(path, rc.Entry(np.arange(2), object(), None), FP)  # not arrays: fails after the temporary file is opened
  assert rc.read(path, FP, shared=True).chosen.shape == (5,)
  assert sorted(os.listdir(tmp_path)) == [f"{FP}.npz"]
