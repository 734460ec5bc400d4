r"""A grain input pipeline: prepared preference data -> batches in the train step's layout.

    loader = PreferenceLoader(source, batch_size=8, layout="prompt_shared", seed=0,
                              layout_kwargs=dict(seq_bucket=64, completion_bucket=16))
    it = loader.iterator()                 # or loader.iterator(saved_state) to resume
    for batch in it: ...                   # batch["pairs"] is a pofx.batching.PairBatch
    saved_state = it.get_state()           # {"step": ..., "signature": ...}; JSON-serialisable

`source` is any random-access sequence of examples with the features of
`pofx.data.tfds_builders` (`prompt`, `chosen`, `rejected` int token ids, `score_chosen`,
`score_rejected`, `example_id`), e.g. `Prepared.source(split)` / `tfds.data_source`.

Order of the data (a pure function of the seed, the step and the process; nothing else):
  1. the global stream: the source shuffled (grain's index shuffle, seed `seed`, a different
     permutation each epoch: seed + epoch), repeated `num_epochs` times (None = forever);
     `shuffle=False` keeps the source order.
  2. per-process sharding: process `p` of `n` (default `jax.process_index()` /
     `jax.process_count()`) takes elements `p, p + n, p + 2n, ...` of the global stream, so the
     processes see disjoint examples that together cover each epoch (a finite stream is cut to
     a multiple of n, so every process makes the same number of steps).
  3. windows of `batch_size * group_by_length` consecutive examples (`group_by_length` <= 1:
     one batch per window). With grouping, a window is sorted by length (prompt + longer
     completion) and cut into batches, and the batches of the window are put in a seeded random
     order, so each batch holds pairs of similar lengths (less padding) while the order stays
     random.
  4. each batch is laid out by `pofx.batching.build(layout, ...)` (fused, prompt_shared or
     packed; `layout_kwargs` = its bucketing arguments, e.g. `seq_bucket`, `completion_bucket`,
     `row_length`, `num_rows`), so a run compiles a handful of shapes.
The batch at step `s` is `loader.batch_at(s)`; an iterator started at step `s` yields exactly
`batch_at(s), batch_at(s + 1), ...`: a killed run that saved `get_state()` resumes with the same
data order. Windows are built ahead in grain's reader threads (`prefetch` windows,
`num_threads` threads), so loading overlaps the train step.

A batch is a dict:
  "pairs": `PairBatch` (numpy arrays);
  "example_id": int32 `[B]` (-1 for padding pairs);
  "chosen_scores", "rejected_scores": float32 `[B]` when `with_scores=True` (a NaN score, i.e. a
    record without scores, raises ValueError naming the example ids);
  one float32 `[B]` array per key of `joined` (e.g. cached reference log-probs
  `ref_chosen_logps`, `ref_rejected_logps` from `pofx.references.precompute`), looked up by
  example id (a missing id raises ValueError).
With `drop_remainder=False` a finite stream ends with a batch padded to `batch_size` pairs
(`pairs.pair_mask` 0, example id -1, scores and joined values 0).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Dict, Mapping, Optional, Union

import jax
import numpy as np

from pofx import batching

# The default rounding of block-pair and scored-token counts: m * 2^k, m = 4..7 (padding under a
# quarter, a few shapes per doubling).
INDEX_BUCKET = batching.geometric_buckets(1 << 20, per_doubling=4)


def _check_row_lengths(layout: str, kwargs: Mapping[str, Any], block_size: int) -> None:
  """Every row length the layout can produce must be a multiple of `block_size` (checked before
  any batch is built): `row_length` or `length_bucket` for "packed", `seq_bucket` otherwise."""
  if layout == "packed":
    key = "row_length" if kwargs.get("row_length") is not None else "length_bucket"
  else:
    key = "seq_bucket"
  fn = {"fused": batching.fused, "prompt_shared": batching.prompt_shared, "packed": batching.packed}[layout]
  value = kwargs.get(key, inspect.signature(fn).parameters[key].default)
  sizes = [value] if isinstance(value, (int, np.integer)) else list(value)
  if not sizes or any(int(v) % block_size for v in sizes):
    raise ValueError(
      f"layout_kwargs[{key!r}]={value!r}: with attention_block_size={block_size} every row length "
      f"must be a multiple of it; allowed: {key} = a multiple of {block_size} (or a list of them)."
    )


def _lengths(ex) -> int:
  return len(ex["prompt"]) + max(len(ex["chosen"]), len(ex["rejected"]))


class PreferenceLoader:
  """Deterministic, resumable, per-process-sharded batches of preference pairs (see module doc).

  Args:
    source: random-access examples (`len`, `[i]` -> dict of numpy arrays).
    batch_size: pairs per batch on this process.
    layout: "fused", "prompt_shared" or "packed" (`pofx.batching`).
    layout_kwargs: keyword arguments of the layout function (buckets, `row_length`, `pad_id`...).
    seed: shuffling seed (0 <= seed < 2**32).
    shuffle: shuffle each epoch (False: source order, e.g. to precompute reference log-probs).
    num_epochs: passes over the data; None repeats forever.
    process_index, process_count: this process's shard; default `jax.process_index()`,
      `jax.process_count()`.
    group_by_length: batches per length-sorted window (<= 1: no grouping).
    drop_remainder: drop a final partial batch (True) or pad it (False) when the stream is finite.
    with_scores: add "chosen_scores" / "rejected_scores".
    joined: per-example arrays joined by id: `{"example_id": [N], key: [N], ...}`.
    prefetch: windows built ahead; num_threads: grain reader threads (0: no background work).
    attention_block_size: > 0 adds "attention_blocks" (`pofx.batching.attention_blocks` with
      blocks of this many tokens), so the policy's forward runs block-sparse attention
      (`pofx.sparse_attention`); every row length of the layout must be a multiple of it.
    scored_tokens: add "scored_tokens" (`pofx.batching.scored_tokens`): the LM head runs on the
      real completion tokens only.
    index_bucket: rounding of the block-pair and scored-token counts (`bucket_length`); default
      `INDEX_BUCKET`. Batches to be stacked need `pofx.batching.pad_index_lists`.
  """

  def __init__(
    self,
    source,
    *,
    batch_size: int,
    layout: str = "fused",
    layout_kwargs: Optional[Mapping[str, Any]] = None,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: Optional[int] = None,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
    group_by_length: int = 0,
    drop_remainder: bool = True,
    with_scores: bool = False,
    joined: Optional[Mapping[str, Any]] = None,
    prefetch: int = 2,
    num_threads: int = 1,
    attention_block_size: int = 0,
    scored_tokens: bool = False,
    index_bucket: Optional[batching.Bucket] = None,
  ):
    import grain  # pylint: disable=g-import-not-at-top

    self._grain = grain
    if layout not in batching.LAYOUTS:
      raise ValueError(f"layout={layout!r} is not allowed; allowed: {list(batching.LAYOUTS)}.")
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not 0 <= int(seed) < 2**32:
      raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs < 1):
      raise ValueError(f"num_epochs must be None or an integer >= 1, got {num_epochs!r}.")
    if process_index is None or process_count is None:
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index must be in [0, process_count={process_count}), got {process_index}.")
    n = len(source)
    if n == 0:
      raise ValueError("the source is empty.")
    self._source, self._batch_size, self._layout = source, batch_size, layout
    self._layout_kwargs = dict(layout_kwargs or {})
    if "num_pairs" in self._layout_kwargs:
      raise ValueError("layout_kwargs: num_pairs is set by the loader (batch_size).")
    self._seed, self._shuffle, self._num_epochs = int(seed), bool(shuffle), num_epochs
    self._p, self._n = int(process_index), int(process_count)
    self._group = max(int(group_by_length), 1)
    self._drop, self._with_scores = bool(drop_remainder), bool(with_scores)
    self._prefetch, self._num_threads = int(prefetch), int(num_threads)
    self._joined = self._index_joined(joined)
    if not isinstance(attention_block_size, (int, np.integer)) or attention_block_size < 0:
      raise ValueError(
        f"attention_block_size must be an integer >= 0 (0: dense attention), got {attention_block_size!r}."
      )
    self._block_size, self._scored = int(attention_block_size), bool(scored_tokens)
    if self._block_size:
      _check_row_lengths(layout, self._layout_kwargs, self._block_size)
    self._index_bucket = INDEX_BUCKET if index_bucket is None else index_bucket

    # Per-process stream length (examples), then batches.
    if num_epochs is None:
      self._per_process = None
      self.num_batches = None
    else:
      self._per_process = (n * num_epochs) // self._n
      if self._per_process == 0:
        raise ValueError(f"{n} examples x {num_epochs} epochs cannot feed {self._n} processes.")
      full, rem = divmod(self._per_process, batch_size)
      self.num_batches = full + (1 if rem and not self._drop else 0)
      if self.num_batches == 0:
        raise ValueError(
          f"{self._per_process} examples per process make no full batch of {batch_size} (drop_remainder=True)."
        )
    self.signature = hashlib.sha256(
      json.dumps(
        {
          "n": n,
          "batch_size": batch_size,
          "layout": layout,
          "seed": self._seed,
          "shuffle": self._shuffle,
          "num_epochs": num_epochs,
          "process": [self._p, self._n],
          "group_by_length": self._group,
          "drop_remainder": self._drop,
          "layout_kwargs": repr(sorted(self._layout_kwargs.items())),
        },
        sort_keys=True,
      ).encode()
    ).hexdigest()[:16]
    self._windows = self._build_windows()

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("the loader repeats forever (num_epochs=None): it has no length.")
    return self.num_batches

  # -------------------------------------------------------------------------------------------

  @staticmethod
  def _index_joined(joined):
    if joined is None:
      return None
    joined = {k: v for k, v in joined.items() if k != "fingerprint"}
    if "example_id" not in joined:
      raise ValueError("joined needs an 'example_id' array beside its per-example arrays.")
    ids = np.asarray(joined["example_id"]).astype(np.int64).ravel()
    if len(np.unique(ids)) != len(ids):
      raise ValueError("joined: duplicate example ids.")
    order = np.argsort(ids)
    arrays = {}
    for k, v in joined.items():
      if k == "example_id":
        continue
      v = np.asarray(v, np.float32)
      if v.shape[:1] != ids.shape:
        raise ValueError(f"joined[{k!r}] has shape {v.shape}; expected ({len(ids)}, ...).")
      arrays[k] = v[order]
    return ids[order], arrays

  def _build_windows(self):
    grain = self._grain
    ds = grain.MapDataset.source(self._source)
    if self._shuffle:
      ds = ds.shuffle(seed=self._seed)
    ds = ds.repeat(self._num_epochs)
    if self._per_process is not None:
      ds = ds[: self._per_process * self._n]
    ds = ds[self._p :: self._n]
    window = self._batch_size * self._group
    if window == 1:  # grain's batch(1) overflows computing the length of an endless stream
      windows = ds.map(lambda example: [example])
    else:
      windows = ds.batch(window, drop_remainder=False, batch_fn=list)
    return windows.map_with_index(self._make_window)

  def _make_window(self, index: int, examples):
    B = self._batch_size
    if self._group > 1:
      examples = sorted(examples, key=_lengths)  # stable: ties keep the stream order
    chunks = [examples[i : i + B] for i in range(0, len(examples), B)]
    if chunks and len(chunks[-1]) < B and self._drop:
      chunks = chunks[:-1]
    if self._group > 1 and len(chunks) > 1:
      rng = np.random.default_rng([self._seed, index])
      chunks = [chunks[i] for i in rng.permutation(len(chunks))]
    return [self._make_batch(c) for c in chunks]

  def _make_batch(self, examples) -> Dict[str, Any]:
    B = self._batch_size
    ids = np.full((B,), -1, np.int64)
    ids[: len(examples)] = [int(e["example_id"]) for e in examples]
    if ids.max() >= 2**31:
      raise ValueError(f"example ids must be < 2**31 to travel as int32; got {ids.max()}.")
    pairs = batching.build(
      self._layout,
      [e["prompt"] for e in examples],
      [e["chosen"] for e in examples],
      [e["rejected"] for e in examples],
      num_pairs=B,
      **self._layout_kwargs,
    )
    out = {"pairs": pairs, "example_id": ids.astype(np.int32)}
    if self._block_size:
      out["attention_blocks"] = batching.attention_blocks(pairs, block_size=self._block_size, bucket=self._index_bucket)
    if self._scored:
      out["scored_tokens"] = batching.scored_tokens(pairs, bucket=self._index_bucket)
    real = ids >= 0
    if self._with_scores:
      for key, field in (("chosen_scores", "score_chosen"), ("rejected_scores", "score_rejected")):
        v = np.zeros((B,), np.float32)
        v[: len(examples)] = [float(e[field]) for e in examples]
        if np.isnan(v).any():
          raise ValueError(f"with_scores=True but examples {ids[np.isnan(v)].tolist()} have no {field} (NaN).")
        out[key] = v
    if self._joined is not None:
      sorted_ids, arrays = self._joined
      pos = np.searchsorted(sorted_ids, ids[real])
      pos = np.minimum(pos, len(sorted_ids) - 1)
      missing = ids[real][sorted_ids[pos] != ids[real]]
      if missing.size:
        raise ValueError(f"joined: no entry for example ids {missing[:10].tolist()}.")
      for k, arr in arrays.items():
        v = np.zeros((B,) + arr.shape[1:], np.float32)
        v[real] = arr[pos]
        out[k] = v
    return out

  # -------------------------------------------------------------------------------------------

  def batch_at(self, step: int) -> Dict[str, Any]:
    """The batch at `step` (random access, no prefetching)."""
    if step < 0 or (self.num_batches is not None and step >= self.num_batches):
      raise ValueError(f"step {step} is outside [0, {self.num_batches}).")
    window, offset = divmod(int(step), self._group)
    return self._windows[window][offset]

  def _check_step(self, step):
    if step < 0 or (self.num_batches is not None and step > self.num_batches):
      raise ValueError(f"step {step} is outside [0, {self.num_batches}].")

  def iterator(self, state: Union[None, int, Mapping[str, Any]] = None) -> LoaderIterator:
    """An iterator from step 0, from `state["step"]` (a `get_state()` of an iterator of a loader
    with the same configuration), or from an integer step."""
    if state is None:
      step = 0
    elif isinstance(state, Mapping):
      if state.get("signature") != self.signature:
        raise ValueError(
          f"cannot resume: the state was saved by a loader with another "
          f"configuration (signature {state.get('signature')} vs {self.signature}: "
          f"data size, batch size, seed, epochs, process or layout differ)."
        )
      step = int(state["step"])
    else:
      step = int(state)
    self._check_step(step)
    return LoaderIterator(self, step)

  def __iter__(self):
    return self.iterator()


class LoaderIterator:
  """Yields the loader's batches from a start step; `get_state()` is the resume point."""

  def __init__(self, loader: PreferenceLoader, step: int):
    grain = loader._grain  # pylint: disable=protected-access
    self._loader, self._step = loader, step
    window, self._offset = divmod(step, loader._group)  # pylint: disable=protected-access
    windows = loader._windows  # pylint: disable=protected-access
    if window < len(windows):
      windows = windows[window:]
      if loader._num_threads > 0:  # pylint: disable=protected-access
        it_ds = windows.to_iter_dataset(
          grain.ReadOptions(num_threads=loader._num_threads, prefetch_buffer_size=max(loader._prefetch, 1))
        )  # pylint: disable=protected-access
      else:
        it_ds = windows.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
      self._windows = iter(it_ds)
    else:
      self._windows = iter(())
    self._current = []

  @property
  def step(self) -> int:
    """Batches consumed so far, counted from the start of the stream (the next batch's step)."""
    return self._step

  def get_state(self) -> Dict[str, Any]:
    return {"step": self._step, "signature": self._loader.signature}

  def __iter__(self):
    return self

  def __next__(self) -> Dict[str, Any]:
    num = self._loader.num_batches
    if num is not None and self._step >= num:
      raise StopIteration
    while not self._current:
      self._current = list(next(self._windows))[self._offset :]
      self._offset = 0
    self._step += 1
    return self._current.pop(0)
