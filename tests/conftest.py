"""Shared fixtures: the Pythia-shaped checkpoint writer of benchmarks/ (one writer of the hub's
layouts, used by the benchmarks and the tests alike)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pythia_like() -> ModuleType:
    """``benchmarks/pythia_like.py`` as a module (benchmarks/ is scripts, not a package)."""
    name = "pythia_like"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
