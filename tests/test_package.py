"""The package's shape: no import cycles, evaluation and benchmarks free of the training loop."""

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, known: set[str]) -> set[str]:
  """Modules of ours `path` imports anywhere in its body (function-level imports too)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f'{node.module}.{a.name}' for a in node.names] + [node.module]
    else:
      continue
    found.update(n for n in names if n in known)
  return found


def import_graph() -> dict[str, set[str]]:
  """Module -> the modules of ours it imports, over cmix_jax, configs and experiments."""
  folders = ('cmix_jax', 'configs', 'experiments')
  files = {_module_name(p): p for f in folders for p in (ROOT / f).rglob('*.py')}
  graph = {name: _imports(path, set(files)) - {name} for name, path in files.items()}
  # `from cmix_jax.pkg.mod import x` runs pkg/__init__ first; that is not a cycle of ours.
  return {name: {d for d in deps if not name.startswith(d + '.')} for name, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a list of modules, or None."""
  state = {}

  def visit(node, path):
    state[node] = 'open'
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 'open':
        return path[path.index(dep) :] + [dep]
      if dep not in state:
        found = visit(dep, path + [dep])
        if found:
          return found
    state[node] = 'done'
    return None

  for start in sorted(graph):
    if start not in state:
      found = visit(start, [start])
      if found:
        return found
  return None


def _reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for dep in graph.get(todo.pop(), ()):
      if dep not in seen:
        seen.add(dep)
        todo.append(dep)
  return seen


def test_cycle_finder_finds_a_planted_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycles_in_the_package():
  assert _cycle(import_graph()) is None


@pytest.mark.parametrize(
  'user', ['cmix_jax/evaluate.py', 'experiments/bench.py', 'experiments/bench_pairing.py']
)
def test_evaluation_and_benchmarks_import_no_training_loop(user):
  graph = import_graph()
  direct = _imports(ROOT / user, set(graph))
  reached = direct.union(*(_reachable(graph, d) for d in direct))
  assert 'cmix_jax.train' not in reached


def test_repo_points_nowhere_outside_itself():
  offenders = []
  for folder in ('cmix_jax', 'configs', 'experiments', 'docs'):
    for path in (ROOT / folder).rglob('*'):
      if path.suffix in ('.py', '.md', '.cfg') and path.is_file():
        text = path.read_text()
        if '../shared' in text or 'METHOD.md' in text or re.search(r'\bissue \d', text):
          offenders.append(str(path.relative_to(ROOT)))
  readme = (ROOT / 'README.md').read_text()
  assert '../shared' not in readme and 'METHOD.md' not in readme
  assert not offenders, offenders
