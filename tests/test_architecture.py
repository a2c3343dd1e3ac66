"""The shape of the package (docs/architecture.md): a capped core that imports none of
its edges (minidl/ext, minidl/cli), imports that point one way, a training loop that
reads as one, and every documented module reachable after ``import minidl``."""
import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import minidl
from minidl import trainer

PACKAGE = Path(minidl.__file__).parent
EDGES = ("ext", "cli")
# Non-blank lines of code, docstrings and comments. The convolution family (issue 24:
# dilation, groups, ConvTranspose2D, pooling's ceil_mode) raised it from 3800.
CORE_CAP = 4000


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
CORE = {name: path for name, path in MODULES.items()
        if path.relative_to(PACKAGE).parts[0] not in EDGES and path.name != "__main__.py"}


def imported_modules(name, path):
    """Every minidl module that ``path`` imports, at the top or inside a function:
    ``import minidl.x``, ``from minidl.x import y``, ``from .x import y``, ``from . import x``."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = (package.rsplit(".", node.level - 1)[0] if node.level > 1 else package) \
                if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            submodules = [f"{module}.{alias.name}" for alias in node.names
                          if f"{module}.{alias.name}" in MODULES]
            targets = submodules or [module]    # "from . import x": x, not the package
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


GRAPH = {name: imported_modules(name, path) for name, path in MODULES.items()}


def non_blank_lines(paths):
    return sum(1 for path in paths for line in path.read_text().splitlines() if line.strip())


def test_the_core_is_at_most_4000_non_blank_lines():
    count = non_blank_lines(CORE.values())
    print(f"\nthe core (minidl/ outside ext/ and cli/): {count} non-blank lines "
          f"(cap {CORE_CAP}); the edges: "
          f"{non_blank_lines(p for n, p in MODULES.items() if n not in CORE)}")
    assert count <= CORE_CAP, f"the core has {count} non-blank lines, over the cap of {CORE_CAP}"


def test_the_core_imports_no_edge():
    edges = tuple(f"minidl.{edge}" for edge in EDGES)
    offenders = {name: sorted(t for t in GRAPH[name] if t.startswith(edges)) for name in CORE}
    assert not {name: found for name, found in offenders.items() if found}
    # nor does anything load them behind its back
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, minidl, minidl.layers, minidl.data; "
                               "print(sorted(m for m in sys.modules if m.startswith("
                               f"{edges!r})))"],
        capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_imports_point_one_way():
    def reaches(start, goal):
        seen, todo = set(), list(GRAPH[start])
        while todo:
            name = todo.pop()
            if name == goal:
                return True
            if name not in seen:
                seen.add(name)
                todo += GRAPH[name]
        return False

    assert "minidl.backend" in GRAPH["minidl.trainer"]      # "from . import backend" counts
    assert "minidl.ext.zoo" in GRAPH["minidl.cli.recipe"]   # ... and "from ..ext.zoo import"
    cycles = sorted(name for name in GRAPH if reaches(name, name))
    assert not cycles, cycles
    # layers/ knows only the backend seam, the checks and the random streams
    for name in (n for n in CORE if n.startswith("minidl.layers")):
        outside = {t for t in GRAPH[name] if not t.startswith("minidl.layers")}
        assert outside <= {"minidl.backend", "minidl.checks", "minidl.random"}, (name, outside)


def test_no_module_is_named_like_the_standard_library():
    clashes = {name.rsplit(".", 1)[-1] for name in MODULES} & set(sys.stdlib_module_names)
    assert clashes <= {"__main__", "random"}, clashes   # minidl/random.py: the one left


def test_the_trainer_knows_no_transport_and_fit_reads_as_the_loop():
    assert not {t for t in GRAPH["minidl.trainer"] if t.startswith("minidl.ext")}
    source = inspect.getsource(trainer.Trainer.fit)
    assert "comm" not in source and "resume" not in source.replace("resumed", "")
    lines = [line for line in source.splitlines() if line.strip()]
    assert len(lines) <= 60, len(lines)


def test_every_documented_module_is_reachable_after_import_minidl():
    """``import minidl`` then ``minidl.ext.plots`` (or any module docs/api.md names)
    works: the edges and the command load on first use."""
    api = (PACKAGE.parent / "docs" / "api.md").read_text()
    section = api[api.index("\n## Modules"):api.index("\n## The `minidl` command")]
    names = sorted(set(re.findall(r"`(minidl(?:\.\w+)+)`", section)))
    assert {"minidl.ext.plots", "minidl.ext.onnx", "minidl.cli.train"} <= set(names)
    script = ("import functools, minidl\n"
              f"for name in {names!r}:\n"
              "    functools.reduce(getattr, name.split('.')[1:], minidl)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
