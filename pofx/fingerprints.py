"""Fingerprints: SHA-256 identities of configs, arrays and the inputs a computation depends on.

One scheme for everything that is cached or resumed: the reference log-prob cache
(`pofx.references.fingerprint`) and the training program's stage records (`experiments/`) both
build their fingerprints here, so that two computations with the same fingerprint read the same
values and inputs.

  fields(config, names)      the named dotted fields of a (nested) config, as a flat dict
  of_values(values)          SHA-256 of JSON-able values (dict keys in any order hash alike)
  of_arrays(tree)            SHA-256 of a pytree of arrays (paths, dtypes, shapes and bytes)
  of(fields, inputs)         a computation's fingerprint: its config fields and its inputs'
                             fingerprints
  differences(old, new)      "name: old -> new" for every field that differs (for messages)

Only `of_arrays` touches JAX (to walk a pytree); the rest hashes plain Python values.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Dict, Iterable, List, Mapping, Optional

import jax
import numpy as np

MISSING = "<absent>"  # the value `fields` gives a name the config does not have


def _plain(value: Any) -> Any:
  """A JSON-able, canonical form: mappings (ConfigDicts too) as dicts, sequences as lists,
  numpy scalars as Python numbers; floats that are whole stay floats (0.1 and 1.0 are distinct
  from 1, as the config types keep them)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  return value


def canonical(values: Any) -> str:
  """The canonical JSON text that `of_values` hashes (sorted keys, no whitespace)."""
  return json.dumps(_plain(values), sort_keys=True, separators=(",", ":"), default=str)


def of_values(values: Any) -> str:
  """SHA-256 (hex) of JSON-able values; mappings hash the same whatever the order of their keys."""
  return hashlib.sha256(canonical(values).encode()).hexdigest()


def fields(config: Any, names: Iterable[str]) -> Dict[str, Any]:
  """{dotted name: value} of `names` in a nested config (a ConfigDict or nested mappings).

  A name that ends in a sub-config (e.g. "world") stands for each of its fields, flattened to
  dotted names ("world.vocab_size", ...), so that a difference names the field; a name the config
  does not have maps to `MISSING`, so that adding a field later reads as a difference."""
  out = {}

  def put(name, value):
    if isinstance(value, Mapping) and value:
      for k, v in value.items():
        put(f"{name}.{k}", v)
    else:
      out[name] = value

  for name in names:
    node = config
    for part in name.split("."):
      if isinstance(node, Mapping) or hasattr(node, "to_dict"):
        node = node[part] if part in node else MISSING
      else:
        node = MISSING
      if node is MISSING:
        break
    put(name, _plain(node))
  return out


def of_arrays(tree: Any) -> str:
  """SHA-256 (hex) of a pytree of arrays: every leaf's path, dtype, shape and bytes.

  The leaves are copied to the host (`np.asarray`); a leaf must be fully addressable."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(a.dtype).encode() + str(a.shape).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def of(config_fields: Mapping[str, Any], inputs: Optional[Mapping[str, Optional[str]]] = None) -> str:
  """A computation's fingerprint: its config fields and the fingerprints of its inputs
  (`{name: fingerprint}`; None for an input it does not have)."""
  return of_values({"fields": dict(config_fields), "inputs": dict(inputs or {})})


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
  """`"name: old -> new"` for every key whose (canonical) value differs, sorted by name; a key
  missing on one side reads as `<absent>`."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = _plain(old.get(k, MISSING)), _plain(new.get(k, MISSING))
    if canonical(a) != canonical(b):
      out.append(f"{k}: {_short(a)} -> {_short(b)}")
  return out


def _short(value: Any) -> str:
  """A value for a one-line message: fingerprints shortened to 12 characters."""
  if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
    return value[:12] + "..."
  text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else repr(value)
  return text if len(text) <= 80 else text[:77] + "..."
