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
    assert f"pip install 'session-rewind-client[{extra}]'" in result.stderr.strip().splitlines()[-1]
