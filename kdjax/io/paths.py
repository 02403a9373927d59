"""Locations a run reads and writes: local paths or URLs (``gs://bucket/run``), through
``etils.epath``, and local mirrors for files that are appended to as a run goes."""

from __future__ import annotations

import os
import shutil
import tempfile

from etils import epath


def as_path(location: str | os.PathLike) -> epath.Path:
    """A local path made absolute, or a URL such as ``gs://bucket/run`` as it is."""
    text = os.fspath(location)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


class LocalMirror:
    """A local directory standing for ``target``, for writers that append (logs, event files):
    object stores cannot append, so the files are written here and copied whole to ``target``
    by :meth:`push`. A local ``target`` is its own mirror, and then nothing is copied.
    """

    def __init__(self, target: str | os.PathLike):
        self.target = as_path(target)
        self._remote = not is_local(self.target)
        self.local = (epath.Path(tempfile.mkdtemp(prefix="kdjax-mirror-")) if self._remote
                      else self.target)
        self.local.mkdir(parents=True, exist_ok=True)

    def pull(self, name: str) -> None:
        """Copies ``target/name`` here if it exists, so that appending continues it."""
        if self._remote and (self.target / name).exists():
            (self.target / name).copy(self.local / name, overwrite=True)

    def push(self) -> None:
        """Copies every file written here to ``target``, replacing the older copies."""
        if not self._remote:
            return
        for folder, _, files in os.walk(self.local):
            for name in files:
                source = epath.Path(folder) / name
                destination = self.target / os.path.relpath(source, self.local)
                destination.parent.mkdir(parents=True, exist_ok=True)
                source.copy(destination, overwrite=True)

    def close(self) -> None:
        self.push()
        if self._remote:
            shutil.rmtree(self.local, ignore_errors=True)


class StorageError(ValueError):
    """A workdir or model location that cannot be reached; the message says what to check."""


def _check_google_credentials() -> None:
    """Raises :class:`StorageError` when no Google Cloud credentials can be found. Skipped for
    a storage emulator (``STORAGE_EMULATOR_HOST``), which takes none."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return
    import google.auth
    import google.auth.exceptions

    try:
        google.auth.default()
    except google.auth.exceptions.DefaultCredentialsError as error:
        raise StorageError(
            f"no Google Cloud credentials were found ({error}). On a workstation run `gcloud auth "
            f"application-default login` or set GOOGLE_APPLICATION_CREDENTIALS to a service "
            f"account key; on a TPU or GCE VM use a service account with access to the "
            f"bucket.") from None


def ensure_reachable(location: str | os.PathLike) -> None:
    """Checks, before any work, that a ``gs://`` location's bucket exists and can be read with
    the credentials at hand; local paths need no check (they are created).

    Raises:
      StorageError: no credentials, no such bucket, or the store could not be reached.
    """
    path = as_path(location)
    text = os.fspath(path)
    if is_local(path):
        return
    scheme, _, rest = text.partition("://")
    bucket = epath.Path(f"{scheme}://{rest.split('/')[0]}")
    if scheme == "gs":
        _check_google_credentials()
    try:
        found = bucket.exists()
    except Exception as error:  # each storage client raises its own types
        raise StorageError(
            f"cannot reach {bucket}: {type(error).__name__}: {str(error).splitlines()[0][:200]}. "
            f"Check the network and your credentials.") from error
    if not found:
        raise StorageError(f"the bucket {bucket} does not exist, or these credentials cannot see "
                           f"it. Create it (`gcloud storage buckets create {bucket}`) or fix the "
                           f"--workdir.")
