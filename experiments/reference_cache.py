"""Reference log-prob caches on disk: the run's own folder, or a folder shared across runs.

A cache entry holds one reference's summed log-probs of the chosen and rejected completions of
every training pair (`example_id`, `chosen`, `rejected`, float32) and the fingerprint it was
computed for (`pofx.references.fingerprint`: the reference weights, the vocabulary, the length
limits, the data and anything else the program passes as `extra`).

- In the run's own workdir (`reference_cache/ref<k>.npz`) an entry of another fingerprint is the
  leftover of an earlier configuration of that workdir: it is recomputed.
- In a shared folder (`train.reference.cache_dir`) entries are named by their fingerprint
  (`<fingerprint>.npz`), so that every run of a sweep over the same reference and data computes
  the reference once and the others read it. An entry whose stored fingerprint differs from its
  name, or whose arrays do not fit together, is an error naming the file: a stale or damaged entry
  is never reused. Entries are written to a temporary file and renamed, so that a run killed while
  writing, or two runs writing the same entry, never leave a partial one.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from typing import NamedTuple, Optional

import numpy as np


class Entry(NamedTuple):
  example_id: np.ndarray  # [N] int64
  chosen: np.ndarray  # [N] float32
  rejected: np.ndarray  # [N] float32


def shared_path(cache_dir: str, fingerprint: str) -> str:
  """The file of the entry with `fingerprint` in the shared folder `cache_dir`."""
  return os.path.join(cache_dir, f"{fingerprint}.npz")


def read(path: str, fingerprint: str, *, shared: bool) -> Optional[Entry]:
  """The entry at `path` if it was computed for `fingerprint`; None if there is none (or, in a
  run's own folder, if it was computed for another fingerprint).

  Raises:
    ValueError: in a shared folder, an entry stored under `fingerprint` that holds another one,
      or (anywhere) an entry whose arrays are missing, of different lengths or not finite.
  """
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as z:
      stored = str(z["fingerprint"])
      entry = Entry(np.asarray(z["example_id"]), np.asarray(z["chosen"]), np.asarray(z["rejected"]))
  except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(
      f"reference cache {path} is not a readable entry ({e}); delete it so that it is recomputed."
    ) from None
  if stored != fingerprint:
    if not shared:
      return None
    raise ValueError(
      f"reference cache {path} holds log-probs for fingerprint {stored[:12]}..., not the "
      f"{fingerprint[:12]}... its name says: it is stale or was overwritten. Delete it so that it is recomputed."
    )
  n = entry.example_id.shape
  if entry.chosen.shape != n or entry.rejected.shape != n or len(n) != 1:
    raise ValueError(
      f"reference cache {path}: example_id {entry.example_id.shape}, chosen {entry.chosen.shape} and "
      f"rejected {entry.rejected.shape} must be equal 1-D shapes; delete it so that it is recomputed."
    )
  if not (np.all(np.isfinite(entry.chosen)) and np.all(np.isfinite(entry.rejected))):
    raise ValueError(f"reference cache {path} holds non-finite log-probs; delete it so that it is recomputed.")
  return entry


def write(path: str, entry: Entry, fingerprint: str) -> None:
  """Writes `entry` with its fingerprint to `path` atomically (a temporary file, then a rename)."""
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".npz", dir=folder)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(
        f,
        example_id=np.asarray(entry.example_id),
        chosen=np.asarray(entry.chosen, np.float32),
        rejected=np.asarray(entry.rejected, np.float32),
        fingerprint=np.asarray(fingerprint),
      )
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
