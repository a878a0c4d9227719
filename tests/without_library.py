"""Run code the way a user without adaptive-depth would: a fresh Python that never imports the library (checked)."""

from __future__ import annotations

import os
import subprocess
import sys


def run_without_the_library(code: str, **env: str) -> str:
    """Run ``code`` in a fresh Python, offline, that must not import adaptive_depth; its standard output."""
    check = "\nimport sys\nassert not any(m.startswith('adaptive_depth') for m in sys.modules), 'imported the plugin'\n"
    done = subprocess.run(
        [sys.executable, "-c", code + check],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
