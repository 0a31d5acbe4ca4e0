"""Every import of the package's own modules resolves, the ones made inside functions included.

Many run only where CI does not: on a GPU (the lent H200's reader, its streams and decode graphs), in a helper
or map worker process, or behind an optional engine. A module moved or a name renamed would surface there
first, in a session with thirty minutes of device time. This reads every ``from ... import ...`` of the
package, the benchmarks, the sample apps and the app's entry point, and imports what each names."""

from __future__ import annotations

import ast
import importlib
import os

import pytest

from tests.conftest import ROOT

PACKAGE = "monailabel_app"
FOLDERS = (PACKAGE, "bench", "sample-apps")


def _sources() -> list[str]:
    found = [os.path.join(ROOT, "main.py")]
    for folder in FOLDERS:
        for here, _, files in os.walk(os.path.join(ROOT, folder)):
            found += [os.path.join(here, f) for f in files if f.endswith(".py")]
    return sorted(found)


def _package_of(path: str) -> list[str]:
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    return rel[:-1]  # a module's package (an __init__'s too: its folder)


def imports_of(path: str) -> list[tuple[int, str, str]]:
    """(line, module, name) of each name imported from this project in the file at ``path``."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            package = _package_of(path)
            base = package[: len(package) - (node.level - 1)]
            module = ".".join(base + (node.module.split(".") if node.module else []))
        else:
            module = node.module or ""
        if module.split(".")[0] == PACKAGE:
            out += [(node.lineno, module, alias.name) for alias in node.names]
    return out


def test_the_package_is_read_whole():
    sources = _sources()
    assert any(p.endswith(os.path.join("grounding", "helper_processes.py")) for p in sources)
    names = {(m, n) for p in sources for _, m, n in imports_of(p)}
    assert ("monailabel_app.phantoms.films", "make_phantom") in names  # the reader's warm-up, inside a function
    assert len(names) > 200


@pytest.mark.parametrize("path", _sources(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_import_of_the_package_resolves(path):
    missing = []
    for line, module, name in imports_of(path):
        try:
            target = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"line {line}: {module} ({e})")
            continue
        if hasattr(target, name):
            continue
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            missing.append(f"line {line}: {name} from {module}")
    assert not missing, missing
