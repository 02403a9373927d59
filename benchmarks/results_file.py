"""Writing a benchmark's generated table into RESULTS.md without touching the other sections."""

from __future__ import annotations

import json
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


def emit(result: dict, text: str, *, json_path: str | None, write: bool,
         section: str, begin: str, end: str) -> None:
    """Prints a benchmark's table, saves its result as JSON if asked, and writes the table into
    RESULTS.md with ``--write``."""
    print(text)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=1))
    if write:
        write_generated(section, begin, end, text)


def section_writer(section: str, begin: str, end: str):
    """``text -> None`` writing a generated table between ``begin`` and ``end`` (see
    :func:`write_generated`)."""
    return lambda text: write_generated(section, begin, end, text)


FROM_JSON_HELP = "measure nothing: print (and with --write record) the table of a saved --json run"


def replay(json_path: str, table, write_section=None) -> dict:
    """The result a ``--json`` run saved: its ``table`` printed, and passed to ``write_section``
    when given (``--from_json FILE [--write]``), so a finished run's table can be recorded later."""
    result = json.loads(Path(json_path).read_text())
    text = table(result)
    print(text)
    if write_section is not None:
        write_section(text)
    return result
