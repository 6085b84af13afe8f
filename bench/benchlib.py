"""What the benchmark scripts share: naming the machine, and updating one section of RESULTS.md."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def write_section(out: Path, section: str, lines: list[str]) -> None:
    """Replace the `section` heading's part of RESULTS.md (up to the next `## `), or append it."""
    text = out.read_text() if out.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    body = "\n".join(lines).rstrip() + "\n"
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + body
    out.write_text(text.rstrip() + "\n")
