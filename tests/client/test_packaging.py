"""What `pip install ./client` puts on an engine author's machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"


def built_package(tmp_path: Path) -> Path:
    """The package directory as a wheel would hold it (setuptools' build_py, what bdist_wheel runs)."""
    source = tmp_path / "client"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    out = tmp_path / "lib"
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(out)],
                   cwd=source, check=True, capture_output=True)
    return out / "session_rewind_client"


def test_the_installed_package_is_typed_for_mypy(tmp_path):
    # Without the PEP 561 marker mypy skips the installed package ("missing library stubs or py.typed
    # marker") and every call an engine makes is unchecked Any, a misspelt argument included.
    package = built_package(tmp_path)

    assert (package / "client.py").exists()
    assert (package / "py.typed").exists()



def test_the_package_version_has_one_source(tmp_path):
    # It was written in pyproject.toml and in __init__.py (the User-Agent's): a release bumping one
    # published a package that named another version to the server.
    source = tmp_path / "client"
    shutil.copytree(CLIENT_DIR, source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"))
    init = source / "src" / "session_rewind_client" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "9.8.7+', 1))
    result = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "--version"],
                            cwd=source, check=True, capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1].startswith("9.8.7")


@pytest.mark.parametrize(("module", "missing", "extra"), [("langgraph", "langchain_core", "langgraph"),
                                                          ("langgraph", "langgraph", "langgraph"),
                                                          ("llamaindex", "workflows", "llamaindex")])
def test_an_integration_without_its_extra_says_which_to_install(module, missing, extra):
    # `pip install ./client` leaves the engines out; importing an integration said only
    # "No module named 'langchain_core'", a module the engine author never asked for.
    blocked = f"import sys; sys.modules[{missing!r}] = None; import session_rewind_client.{module}"
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(CLIENT_DIR / "src")})
    assert result.returncode != 0
    # The package is on no public index: the hint names the checkout's directory first (it named only
    # the package, which pip then could not find).
    assert f"pip install './client[{extra}]' from a Session Rewind checkout" in result.stderr.strip().splitlines()[-1]


def test_a_type_checker_flags_an_async_call_whose_await_was_forgotten(tmp_path):
    # AsyncClient's methods were typed as returning Any, so `rewind.record(...)` without `await` (a
    # write that never happens, a RuntimeWarning at best) passed mypy.
    (tmp_path / "engine.py").write_text(
        "from session_rewind_client import AsyncClient, Client\n"
        "async def step(rewind: AsyncClient, blocking: Client) -> None:\n"
        "    session = await rewind.create_session('run-42')\n"
        "    rewind.record(session['id'], {'step': 1})\n"
        "    blocking.record(session['id'], {'step': 1})\n"
    )
    (tmp_path / "mypy.ini").write_text("[mypy]\nstrict = True\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "mypy.ini", "--cache-dir", "cache", "engine.py"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "MYPYPATH": str(CLIENT_DIR / "src")},
    )
    assert result.stdout.splitlines()[0] == (
        'engine.py:4: error: Value of type "Coroutine[Any, Any, Any]" must be used  [unused-coroutine]'
    ), result.stdout
    assert "Found 1 error" in result.stdout
