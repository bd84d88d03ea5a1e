"""The public surface: ``rseq.__all__`` is what is exported, documented and
stubbed; public exceptions live at ``rseq.``; the ``_core`` stub matches
the extension module."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess
import sys

import pytest

import rseq
from rseq import _core

PACKAGE_DIR = os.path.dirname(rseq.__file__)
# The checkout this test file is in (the package itself may be installed
# elsewhere, as in CI: never look for the README next to the package).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")
CORE_STUB = os.path.join(PACKAGE_DIR, "_core.pyi")


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def stub_names(path: str) -> set[str]:
    tree = ast.parse(read_text(path))
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def readme_api_names() -> set[str] | None:
    """The first identifier of each `code span` in README.md's API section
    (`cpu()` -> cpu, `Arena.create(name)` -> Arena, `rseq.model` -> model),
    or None if the README has no such section yet."""
    if not os.path.exists(README):
        return None
    text = read_text(README)
    heading = re.search(r"^(#+)\s+API\s*$", text, re.MULTILINE)
    if not heading:
        return None
    level = len(heading.group(1))
    rest = text[heading.end():]
    end = re.search(rf"^#{{1,{level}}}\s", rest, re.MULTILINE)
    section = rest[:end.start()] if end else rest
    return set(re.findall(r"`(?:rseq\.)?([A-Za-z_][A-Za-z0-9_]*)", section))


def test_all_is_exactly_the_public_names():
    assert len(rseq.__all__) == len(set(rseq.__all__))
    assert sorted(rseq.__all__) == rseq.__all__
    for name in rseq.__all__:
        assert hasattr(rseq, name), name
    # Nothing public outside __all__ except submodules and the version.
    public = {name for name in dir(rseq) if not name.startswith("_")
              and not inspect.ismodule(getattr(rseq, name))}
    assert public == set(rseq.__all__)


def test_core_features_are_exported():
    core = {"cpu", "node", "mm_cid", "register", "unregister", "registration_count",
            "registered", "info", "Info", "get_include", "RseqError", "Unsupported",
            "RegistrationError", "NotOwnedWarning"}
    assert core <= set(rseq.__all__)


def test_all_matches_readme_api_section():
    documented = readme_api_names()
    assert documented is not None, "README.md has no API section"
    missing = set(rseq.__all__) - documented
    assert not missing, f"exported but not documented in README.md: {sorted(missing)}"
    # A documented attribute of rseq is exported (or is a submodule).
    hidden = {name for name in documented - set(rseq.__all__)
              if hasattr(rseq, name) and not inspect.ismodule(getattr(rseq, name))
              and not name.startswith("_")}
    assert not hidden, f"documented but not in __all__: {sorted(hidden)}"


def test_core_exports_are_stubbed_and_exist():
    declared = stub_names(CORE_STUB)
    runtime = {name for name in dir(_core) if not name.startswith("__")}
    assert declared - runtime == set(), "stubbed but missing at run time"
    assert runtime - declared == set(), "missing from src/rseq/_core.pyi"
    reexported = {name for name in rseq.__all__
                  if getattr(rseq, name) is getattr(_core, name, None)}
    assert reexported <= declared


def test_stub_signatures_match_text_signatures():
    """For each C function with a text signature, the stub has the same
    parameter names."""
    tree = ast.parse(read_text(CORE_STUB))
    stub_functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    checked = 0
    for name, fn in stub_functions.items():
        if not getattr(getattr(_core, name), "__text_signature__", None):
            continue    # 3.13 invents "(object, /)" for METH_O without one
        signature = inspect.signature(getattr(_core, name))
        stub_params = [a.arg for a in fn.args.posonlyargs + fn.args.args]
        assert list(signature.parameters) == stub_params, name
        checked += 1
    assert checked >= 8


def test_exceptions_have_public_module():
    exceptions = [getattr(rseq, name) for name in rseq.__all__
                  if isinstance(getattr(rseq, name), type)
                  and issubclass(getattr(rseq, name), BaseException)]
    assert rseq.RegistrationError in exceptions and len(exceptions) >= 4
    for exc in exceptions:
        assert exc.__module__ == "rseq", exc
        assert exc.__doc__ and len(exc.__doc__) > 20, exc


def test_exception_hierarchy():
    assert issubclass(rseq.Unsupported, rseq.RseqError)
    assert issubclass(rseq.RegistrationError, rseq.RseqError)
    assert issubclass(rseq.RegistrationError, OSError)
    assert issubclass(rseq.NotOwnedWarning, RuntimeWarning)
    error = rseq.RegistrationError(1, "denied")
    assert error.errno == 1 and error.strerror == "denied"
    assert isinstance(error, PermissionError) is False  # no errno->subclass mapping


def test_public_functions_are_documented():
    for name in rseq.__all__:
        obj = getattr(rseq, name)
        assert obj.__doc__, name
    for name in ("cpu", "node", "mm_cid", "register", "unregister", "registration_count"):
        assert inspect.signature(getattr(rseq, name)).parameters == {}


def test_typing_files_are_shipped():
    assert os.path.exists(os.path.join(PACKAGE_DIR, "py.typed"))
    assert os.path.exists(CORE_STUB)
    assert os.path.isdir(rseq.get_include())
    for header in ("abi.h", "capi.h"):
        assert os.path.exists(os.path.join(rseq.get_include(), "rseq", header))


def test_info_is_frozen_and_complete():
    facts = rseq.info()
    with pytest.raises(dataclasses.FrozenInstanceError):
        facts.cpu = 3  # type: ignore[attr-defined]
    assert set(facts.as_dict()) == set(_core.info_dict())
    assert facts.has_field("cpu_id") == (facts.owner is not None)


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy not installed")
def test_stub_and_package_type_check(tmp_path):
    sample = tmp_path / "use_rseq.py"
    sample.write_text(
        "import rseq\n"
        "c: int = rseq.cpu()\n"
        "n: int = rseq.register()\n"
        "b: bool = rseq.unregister()\n"
        "i: rseq.Info = rseq.info()\n"
        "with rseq.registered() as count:\n"
        "    reveal_type(count)\n"
        "from rseq import _core\n"
        "t: tuple[int, int, int, int] = _core.thread_configuration(1)\n"
        "pc = rseq.PerCpuCounter(index='cpu')\n"
        "pc.add(); pc.add(5); pc.add(n=2)\n"
        "v: int = pc.value() + pc.reset() + sum(pc.per_cpu())\n"
        "with rseq.Arena.create('/tmp/never-run', capacity=4) as arena:\n"
        "    ac: rseq.ArenaCounter = arena.counter('k')\n"
        "    keys: list[str] = arena.keys()\n"
        "    maybe = arena.get('k')\n"
        "    w: int = ac.value()\n")
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental",
                           "--python-version", "3.11", str(sample)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0 and "error" not in proc.stdout, proc.stdout
    assert re.search(r'Revealed type is "(builtins\.)?int"', proc.stdout), proc.stdout


def test_metrics_names_are_documented():
    """Every public name of rseq.metrics is named in README.md's API section,
    and everything it exports exists and has a docstring or is a constant."""
    import rseq.metrics as metrics
    documented = readme_api_names()
    assert documented is not None, "README.md has no API section"
    missing = set(metrics.__all__) - documented
    assert not missing, f"rseq.metrics exports undocumented names: {sorted(missing)}"
    assert sorted(metrics.__all__) == metrics.__all__
    public = {name for name in dir(metrics) if not name.startswith("_")
              and not inspect.ismodule(getattr(metrics, name))}
    assert public == set(metrics.__all__)
    for name in metrics.__all__:
        obj = getattr(metrics, name)
        if callable(obj):
            assert obj.__doc__, name
