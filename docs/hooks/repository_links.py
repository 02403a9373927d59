"""MkDocs hook: links from docs/ to the rest of the repository (source files, configs, the
benchmarks' results).

The Markdown in docs/ is read in two places: on the repository host, where ``../kdjax/losses/dist.py``
is a working link, and on the docs site, which holds only docs/. For the site each such link is
checked (a missing file is a warning, so a strict build fails) and then pointed at the file on
the repository host when ``repo_url`` is set in mkdocs.yml, or reduced to its text when not.
"""

from __future__ import annotations

import logging
import posixpath
import re
from pathlib import Path

log = logging.getLogger("mkdocs.plugins.kdjax")

# [text](target) outside code; images too (the leading "!" is kept out of the text).
LINK = re.compile(r"(?<!\!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^[ \t]*(```|~~~)", re.M)


def _repository_target(page_path: str, target: str, docs_dir: Path) -> str | None:
    """The repository path ``target`` points at when it leaves docs/, else None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:|^#|^/", target):
        return None
    path = target.split("#", 1)[0]
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(page_path), path))
    if not resolved.startswith("../"):
        return None
    return posixpath.normpath(posixpath.join(docs_dir.name, resolved))


def on_page_markdown(markdown: str, page, config, files) -> str:
    docs_dir = Path(config["docs_dir"])
    repository = docs_dir.parent
    repo_url = (config.get("repo_url") or "").rstrip("/")
    parts = FENCE.split(markdown)
    # split() with one group yields text, fence, text, fence, ...: the text between an opening
    # and a closing fence is code, left alone.
    inside = False
    out = []
    for index, part in enumerate(parts):
        if index % 2 == 1:
            inside = not inside
            out.append(part)
            continue
        if inside:
            out.append(part)
            continue

        def replace(match):
            target = match.group("target")
            path = _repository_target(page.file.src_uri, target, docs_dir)
            if path is None:
                return match.group(0)
            if not (repository / path).exists():
                log.warning("Doc file '%s' links to '%s', which is not in the repository.",
                            page.file.src_uri, target)
                return match.group(0)
            if not repo_url:
                return match.group("text")
            file, hash_, anchor = target.partition("#")
            kind = "tree" if (repository / path).is_dir() else "blob"
            slash = "/" if file.endswith("/") else ""
            return f"[{match.group('text')}]({repo_url}/{kind}/main/{path}{slash}{hash_}{anchor})"

        out.append(LINK.sub(replace, part))
    return "".join(out)
