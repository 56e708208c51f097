"""Import structure at run time: every biwm.core module imports on its own (no cycle bites in any
import order), stages are reached only through the plugin registry, the CLI imports no stage
runner it does not run, and core never imports the toy world (biwm-toyworld is a plugin core
works without). (tests/test_imports.py checks the static module-level graph.)"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env
from test_imports import CORE, module_imports

# Imports each module named on stdin, one per line, first thing in a forked child of an interpreter
# that has loaded the third-party stack but nothing of biwm: so each child imports its module as
# `python -c "import biwm.core.X"` would, without paying for torch once per module.
IMPORT_EACH_ALONE = r"""
import importlib, json, os, sys, traceback
import pluggy, pydantic, rich, torch, typer, yaml  # noqa: F401  the heavy third-party stack, loaded once
assert not [m for m in sys.modules if m.startswith("biwm")]
failures = {}
for name in sys.stdin.read().split():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            importlib.import_module(name)
            os._exit(0)
        except BaseException:
            with os.fdopen(write, "w") as out:
                out.write(traceback.format_exc(limit=-4))
            os._exit(1)
    os.close(write)
    with os.fdopen(read) as inp:
        error = inp.read()
    if os.waitpid(pid, 0)[1] != 0:
        failures[name] = error or "failed with no traceback"
print(json.dumps(failures))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_every_core_module_imports_alone():
    modules = sorted(module_imports())
    assert len(modules) > 20 and "biwm.core.stages.finetune" in modules
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE], input="\n".join(modules), capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout)
    assert not failures, "\n\n".join(f"import {name} (alone):\n{error}" for name, error in failures.items())


def test_the_alone_import_check_catches_a_cycle(tmp_path):
    """The check above fails on a real cycle: a package whose two modules import each other's names."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic.b import B\nA = 1\n")
    (package / "b.py").write_text("from cyclic.a import A\nB = 2\n")
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE], input="cyclic.a\ncyclic.b", capture_output=True,
                          text=True, env=subprocess_env(PYTHONPATH=str(tmp_path)), timeout=300)
    failures = json.loads(proc.stdout)
    assert set(failures) == {"cyclic.a", "cyclic.b"} and "partially initialized" in failures["cyclic.a"]


BUILTIN_STAGE_MODULES = {f"biwm.core.stages.{name}" for name in ("finetune", "distill", "generate", "evaluate",
                                                                   "export")}


def test_stages_are_reached_only_through_the_registry():
    """No core module but builtins (which registers them) imports a stage's module, even inside a
    function: recipe validation and the runner find stages in the plugin registry."""
    importers = {}
    for path in CORE.rglob("*.py"):
        name = ".".join(("biwm", "core", *path.relative_to(CORE).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for module in names:
                if module in BUILTIN_STAGE_MODULES and name not in BUILTIN_STAGE_MODULES | {"biwm.core.builtins"}:
                    importers.setdefault(name, set()).add(module)
    assert not importers, importers


# What a CLI command imports: the `biwm` entry point run in a fresh interpreter, then its sys.modules.
CLI_MODULES = r"""
import json, runpy, sys
sys.argv = ["biwm", *sys.argv[1:]]
try:
    runpy.run_module("biwm.core.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted(m for m in sys.modules if m.startswith("biwm"))}), file=sys.stderr)
"""
# Imported only by the stages' runners (and by the commands that run them).
RUNNER_ONLY = {"biwm.core.runner", "biwm.core.evaluation", "biwm.core.ema", "biwm.toyworld.idm",
               "biwm.toyworld.scores"}


def cli_modules(*args: str) -> set[str]:
    proc = subprocess.run([sys.executable, "-c", CLI_MODULES, *args], capture_output=True, text=True,
                          env=subprocess_env(COLUMNS="200"), cwd=ROOT, timeout=300)
    result = json.loads(proc.stderr.strip().splitlines()[-1])
    assert result["code"] in (0, None), proc.stderr[-3000:]
    return set(result["modules"])


def test_cli_help_imports_no_stage_nor_runner():
    loaded = cli_modules("--help")
    assert "biwm.core.plugins" in loaded  # it did look for plugin commands
    assert not {m for m in loaded if m.startswith("biwm.core.stages")}, loaded
    assert not loaded & (RUNNER_ONLY | {"biwm.core.dmd", "biwm.core.recipe", "biwm.core.sampling"}), loaded


def test_validating_and_listing_import_stage_configs_but_no_runner():
    for args in (["validate", "examples/quickstart.yaml"], ["list-plugins", "--json"]):
        loaded = cli_modules(*args)
        assert BUILTIN_STAGE_MODULES <= loaded, args  # the stages' config models
        assert not loaded & RUNNER_ONLY, (args, loaded & RUNNER_ONLY)


# A string that names a toy-world module as code would use it: importlib.import_module("biwm.toyworld.x")
# or a lazy "biwm.toyworld.x:attr" reference (prose in docstrings may mention the package).
TOY_MODULE_STRING = re.compile(r"biwm\.toyworld(\.\w+)*(:[\w.]+)?")


def toyworld_references(source: str) -> list[str]:
    """Every way a module's source imports biwm.toyworld: import statements anywhere (also inside
    functions and ``if TYPE_CHECKING:``), ``from biwm import toyworld``, and module-path strings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name == "biwm.toyworld" or a.name.startswith("biwm.toyworld.")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "biwm.toyworld" or node.module.startswith("biwm.toyworld."):
                found.append(node.module)
            elif node.module == "biwm" and any(a.name == "toyworld" for a in node.names):
                found.append("from biwm import toyworld")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and TOY_MODULE_STRING.fullmatch(node.value):
            found.append(repr(node.value))
    return found


def test_core_never_imports_the_toy_world():
    """biwm-core must work without biwm-toyworld installed: the toy world, its IDM and its scores
    reach core only through the plugin hooks (a dataset, its EvaluationScores, its commands)."""
    offenders = {str(path.relative_to(CORE)): refs for path in sorted(CORE.rglob("*.py"))
                 if (refs := toyworld_references(path.read_text()))}
    assert not offenders, offenders
    assert len(list(CORE.rglob("*.py"))) > 20  # the scan saw core's modules
    assert not (CORE / "toyworld.py").exists() and not (CORE / "idm.py").exists() and not (CORE / "assets").exists()


def test_the_toyworld_scan_catches_an_import():
    assert toyworld_references("def f():\n    from biwm.toyworld.idm import load_idm\n") == ["biwm.toyworld.idm"]
    assert toyworld_references("import biwm.toyworld.world as w\n") == ["biwm.toyworld.world"]
    assert toyworld_references("from biwm import toyworld\n") == ["from biwm import toyworld"]
    assert toyworld_references("x = importlib.import_module('biwm.toyworld.scores')\n") == ["'biwm.toyworld.scores'"]
    assert toyworld_references('"""The toy world is biwm.toyworld\'s (:mod:`biwm.toyworld.data`)."""\n') == []


ALL_CORE_MODULES = r"""
import importlib, json, sys
for name in sys.stdin.read().split():
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("biwm."))))
"""


def test_importing_all_of_core_loads_nothing_of_the_toy_world():
    modules = sorted(module_imports())
    proc = subprocess.run([sys.executable, "-c", ALL_CORE_MODULES], input="\n".join(modules), capture_output=True,
                          text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout)
    assert "biwm.core.stages.evaluate" in loaded and "biwm.core.evaluation" in loaded
    assert not [m for m in loaded if not m.startswith("biwm.core")], loaded
