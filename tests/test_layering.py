"""The library's layering, read from the source with `ast` (nothing is imported):

  1. no import cycles among `pofx` modules (module-level imports);
  2. no module uses another module's private names: `from pofx.x import _y`, `import pofx.x._y`,
     or `x._y` on an imported pofx module, unless the importer lives inside the package that owns
     the private name (`pofx.losses._common` is private to `pofx.losses/`; `pofx._pair_logps` to
     `pofx/`);
  3. no `import` inside a function, except of the optional dependencies listed in
     `OPTIONAL_DEPENDENCIES` (heavy or not needed by the core).

`PENDING` may list known violations while they are being cleared; it is empty.
"""

import ast
import os
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = "pofx"

# Top-level names of the dependencies a pofx function may import on use.
OPTIONAL_DEPENDENCIES = frozenset(
  {
    "grain",  # pofx.data: the input pipeline
    "tensorflow_datasets",  # pofx.data: TFDS builders
    "tokenizers",  # pofx.data: local tokenizer.json
    "jinja2",  # pofx.data: chat templates
    "pyarrow",  # pofx.data: Parquet preference files
    "gguf",  # pofx.models.gguf: GGUF files (the test extra)
  }
)

# (file, what) of known violations being cleared (empty: there are none).
PENDING = frozenset()


def _modules():
  """{dotted module name: (relative path, ast)} for every .py file under pofx/."""
  out = {}
  for path in sorted((REPO / PACKAGE).rglob("*.py")):
    rel = path.relative_to(REPO)
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = (str(rel).replace(os.sep, "/"), ast.parse(path.read_text(), filename=str(rel)))
  return out


MODULES = _modules()


def _is_package(name):
  return MODULES.get(name, ("",))[0].endswith("__init__.py")


def _resolve(importer, node):
  """The absolute module of an ImportFrom (relative imports resolved)."""
  if not node.level:
    return node.module or ""
  base = importer.split(".")
  if not _is_package(importer):
    base = base[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(importer, tree_or_node):
  """(lineno, imported module or name, alias bound or None, is_from) of every import under a node."""
  for node in ast.walk(tree_or_node):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield node.lineno, a.name, a.asname, False
    elif isinstance(node, ast.ImportFrom):
      mod = _resolve(importer, node)
      for a in node.names:
        yield node.lineno, f"{mod}.{a.name}", a.asname or a.name, True


def _target_module(dotted):
  """The pofx module an imported dotted name loads: itself if a module, else its parent."""
  while dotted and dotted not in MODULES:
    dotted = dotted.rpartition(".")[0]
  return dotted or None


def _named_module(module, name):
  """What `from module import name` names: the submodule if there is (or was) one, else the module."""
  dotted = f"{module}.{name}"
  return dotted if dotted in MODULES or module == PACKAGE or module not in MODULES else module


def _top_level_nodes(tree):
  """Module-level statements, looking into if/try blocks but not into functions or classes."""
  todo = list(tree.body)
  while todo:
    node = todo.pop()
    yield node
    if isinstance(node, (ast.If, ast.Try)):
      todo.extend(
        node.body
        + node.orelse
        + getattr(node, "finalbody", [])
        + [s for h in getattr(node, "handlers", []) for s in h.body]
      )


def _graph():
  graph = {}
  for name, (_, tree) in MODULES.items():
    edges = set()
    for node in _top_level_nodes(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for _, dotted, _, _ in _imports(name, node):
          target = _target_module(dotted) if dotted.startswith(PACKAGE + ".") or dotted == PACKAGE else None
          if target and target != name:
            edges.add(target)
    graph[name] = edges
  return graph


def find_cycles(graph):
  """Every elementary cycle reachable by depth-first search, each once (as a sorted tuple)."""
  cycles, state, stack = set(), {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == "open":
        cycles.add(tuple(stack[stack.index(m) :]))
      elif m not in state:
        visit(m)
    stack.pop()
    state[n] = "done"

  for n in sorted(graph):
    if n not in state:
      visit(n)
  return sorted(cycles)


def _owner_package(private_dotted):
  """`pofx.losses._common` -> `pofx.losses`: the package whose modules may use the private name."""
  parts = private_dotted.split(".")
  i = next(k for k, p in enumerate(parts) if p.startswith("_") and not p.startswith("__"))
  owner = ".".join(parts[:i])
  return owner if _is_package(owner) or owner == PACKAGE else owner.rpartition(".")[0]


def _private(dotted):
  return any(p.startswith("_") and not p.startswith("__") for p in dotted.split(".")[1:])


def _inside(importer, package):
  return importer == package or importer.startswith(package + ".")


def private_name_uses():
  """{(file, "private <dotted>")}: another module's private names used across packages."""
  found = set()
  for name, (rel, tree) in MODULES.items():
    aliases = {}
    for _, dotted, alias, is_from in _imports(name, tree):
      if not dotted.startswith(PACKAGE + "."):
        continue
      if _private(dotted) and not _inside(name, _owner_package(dotted)):
        found.add((rel, f"private {dotted}"))
      if alias and (not is_from or dotted in MODULES):
        aliases[alias] = dotted
    for node in ast.walk(tree):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
      ):
        dotted = f"{aliases[node.value.id]}.{node.attr}"
        if not _inside(name, _owner_package(dotted)):
          found.add((rel, f"private {dotted}"))
  return found


def in_function_imports():
  """{(file, "in-function import <module>"): [line, ...]} of imports inside functions."""
  found = {}
  for name, (rel, tree) in MODULES.items():
    for fn in ast.walk(tree):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for stmt in ast.walk(fn):
        if isinstance(stmt, ast.Import):
          mods = [a.name for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom):
          mod = _resolve(name, stmt)
          mods = [_named_module(mod, a.name) for a in stmt.names] if mod.startswith(PACKAGE) else [mod]
        else:
          continue
        for m in mods:
          if m.split(".")[0] not in OPTIONAL_DEPENDENCIES:
            found.setdefault((rel, f"in-function import {m}"), set()).add(stmt.lineno)
  return {k: sorted(v) for k, v in found.items()}


def test_the_checker_sees_a_cycle():
  assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
  assert find_cycles({"a": {"b"}, "b": set()}) == []
  assert "pofx.train" in MODULES and "pofx.losses._common" in MODULES


def test_no_import_cycles_among_pofx_modules():
  graph = _graph()
  assert "pofx.collectives" in graph["pofx.train"] and "pofx.train" in graph["pofx.parallel"]
  assert graph["pofx.collectives"] == set()  # a leaf: jax and numpy only
  assert find_cycles(graph) == []


def test_no_module_uses_another_modules_private_names():
  new = sorted(private_name_uses() - PENDING)
  assert new == [], "private names used across modules (make them public):\n" + "\n".join(f"  {f}: {w}" for f, w in new)


def test_imports_at_the_top_except_optional_dependencies():
  found = in_function_imports()
  new = sorted(f"  {f}:{','.join(map(str, lines))}: {w}" for (f, w), lines in found.items() if (f, w) not in PENDING)
  assert new == [], "imports inside functions (move them to the top of the module):\n" + "\n".join(new)
