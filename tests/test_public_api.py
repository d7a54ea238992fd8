"""Every name of the public API resolves, and importing the package stays light."""

from __future__ import annotations

import subprocess
import sys

import mvmr_hf


def test_every_public_name_resolves():
    for name in mvmr_hf.__all__:
        assert getattr(mvmr_hf, name) is not None, name


def test_import_does_not_pull_in_transformers_or_datasets():
    code = "import sys, mvmr_hf; print(any(m in sys.modules for m in ('transformers', 'datasets', 'timm')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
