"""Packaging: what pyproject.toml installs.

pyproject lists simcrop's packages explicitly, because kernels/ installs under another name (simcrop.kernels) and
packages.find cannot rename a folder: every new subpackage must be added there by hand, and this says when one is
missing.
"""
from pathlib import Path

import pytest


def test_every_package_is_listed():
    """pyproject lists packages explicitly (kernels/ installs as simcrop.kernels): no subpackage may be missing."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {str(p.parent.relative_to(root)).replace("/", ".") for p in (root / "simcrop").rglob("__init__.py")}
    assert found | {"simcrop.kernels"} == set(tool["packages"])
    assert tool["package-dir"]["simcrop.kernels"] == "kernels" and (root / "kernels" / "__init__.py").is_file()
