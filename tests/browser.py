"""Headless Chromium for the browser tests: the system's Chromium (Debian package chromium), never a
downloaded one. Missing, it skips a test locally and fails it in CI, where it must be installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from .conftest import REPO

# For a headless browser on a machine with no network: no GPU, no QUIC, no update, sync or other
# background traffic; no sandbox, since CI runs as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Where screenshots are kept for a person to look at (git-ignored: reports/*).
ARTIFACTS = REPO / "reports" / "test-artifacts"


def chromium() -> str:
    """The Chromium executable; skips (locally) or fails (CI) the calling test when there is none."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is required in CI (Debian package chromium; make test installs it as root)")
    pytest.skip("chromium is not installed (Debian: apt-get install chromium, or run make test as root)")


def keep_screenshot(path: Path) -> Path:
    """Copy a screenshot to the test artifacts; returns the copy."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, ARTIFACTS / path.name))
