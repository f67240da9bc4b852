"""The package's layout holds: a folder says which process runs its code, and the import graph agrees;
``import jaxseq`` starts nothing heavy; every public name has an example that runs."""

from __future__ import annotations

import ast
import doctest
import subprocess
import sys
from pathlib import Path

import pytest

import bridges
import jaxseq

PACKAGE = Path(jaxseq.__file__).parent

# Which process runs a module, by its package.
SIDES = {
    "jaxseq.client": "client",
    "jaxseq.server": "server",
    "jaxseq.models": "both",
    "jaxseq.remote": "both",
    "jaxseq.arrays": "both",
    "jaxseq.memory": "both",
    "jaxseq.web": "web",
    "jaxseq.testing": "support",
    "jaxseq.cli": "support",
}
# What each side may import from the others (support code may import anything).
# A web process (``jaxseq monitor``, ``jaxseq serve-api``) is a client of the swarm that serves HTTP.
ALLOWED = {
    "client": {"client", "both"},
    "server": {"server", "both"},
    "both": {"both"},
    "web": {"web", "client", "both"},
}
# The one exception, declared: ``jaxseq.remote.RemoteSequenceManager`` is a lazy accessor kept for code
# written before the layout; it imports the client only when that name is used.
EXCEPTIONS = {("jaxseq.remote", "jaxseq.client.remote_manager")}


def side(module: str) -> str:
    for prefix, name in SIDES.items():
        if module == prefix or module.startswith(prefix + "."):
            return name
    return "api"  # the package itself: the user's API


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def jaxseq_imports(path: Path) -> set[str]:
    """The jaxseq modules a file imports, anywhere in it (a lazy import inside a function counts too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # ``from jaxseq.remote import dht`` imports the module jaxseq.remote.dht
            found |= {f"{node.module}.{a.name}" for a in node.names if _is_module(f"{node.module}.{a.name}")}
    return {name for name in found if name == "jaxseq" or name.startswith("jaxseq.")}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_a_side_imports_only_what_its_process_may_run(path):
    importer = module_name(path)
    if side(importer) not in ALLOWED:
        return  # support code and the public API may import any side
    wrong = [
        name
        for name in jaxseq_imports(path)
        if side(name) not in ALLOWED[side(importer)] and (importer, name) not in EXCEPTIONS
    ]
    assert not wrong, f"{importer} ({side(importer)} side) imports {wrong}"


def test_the_check_sees_a_forbidden_import(tmp_path):
    """The rule above can fail: a server module importing the manager is caught."""
    names = jaxseq_imports(PACKAGE / "server" / "backend.py")
    assert "jaxseq.models.decoder" in names and all(side(n) in ALLOWED["server"] for n in names)
    bad = tmp_path / "bad.py"
    bad.write_text("from jaxseq.client import manager\n")
    assert sorted(n for n in jaxseq_imports(bad) if side(n) not in ALLOWED["server"]) == [
        "jaxseq.client",
        "jaxseq.client.manager",
    ]


def test_importing_jaxseq_starts_neither_hivemind_nor_torch():
    code = "import sys, jaxseq; print(sorted(m for m in ('hivemind', 'torch') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_the_remote_manager_is_reachable_from_both_of_its_names():
    from jaxseq.client.remote_manager import RemoteSequenceManager
    from jaxseq.remote import RemoteSequenceManager as OldName

    assert jaxseq.RemoteSequenceManager is RemoteSequenceManager is OldName


NEEDS_A_SERVER_PROCESS = {"RemoteSequenceManager"}  # examples with +SKIP, and why: a real server process


@pytest.mark.parametrize("module,name", [(jaxseq, n) for n in jaxseq.__all__] + [(bridges, n) for n in bridges.__all__])
def test_every_public_name_has_an_example_that_runs(module, name):
    examples = doctest.DocTestParser().get_examples(getattr(module, name).__doc__ or "")
    assert examples, f"{module.__name__}.{name} has no docstring example"
    running = [e for e in examples if not e.options.get(doctest.SKIP)]
    assert running or name in NEEDS_A_SERVER_PROCESS, f"every example of {name} is skipped"
