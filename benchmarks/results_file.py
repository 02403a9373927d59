"""Writing a benchmark's generated table into RESULTS.md without touching the other sections."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_generated(section: str, begin: str, end: str, text: str) -> None:
    """Replaces the text between the ``begin`` and ``end`` markers (``text`` carries both), or
    appends ``section`` (a '## ...' heading) with ``text`` when the markers are absent."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if begin in old and end in old:
        start, stop = old.index(begin), old.index(end) + len(end) + 1
        new = old[:start] + text + old[stop:]
    else:
        new = old.rstrip("\n") + f"\n\n{section}\n\n" + text
    RESULTS.write_text(new)
