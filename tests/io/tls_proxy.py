"""A local HTTPS proxy that hands Google's storage hosts to the Cloud Storage emulator.

TensorFlow's GCS file system has no endpoint setting: it always asks https://www.googleapis.com
(metadata, listings, uploads) and https://storage.googleapis.com (reads). It does follow libcurl's
``https_proxy`` and trusts the CA file in ``CURL_CA_BUNDLE``, so :class:`TlsProxy` answers its
``CONNECT``, ends TLS with a certificate for those hosts signed by a test authority
(:func:`make_certificates`), and relays the plain HTTP to the emulator on loopback. Any other
``CONNECT`` target is refused: the proxy never opens a connection but to the emulator.

The relay forwards each request as it came, with two changes that fake-gcs-server (a Go HTTP
server) needs, and answers itself a request of TensorFlow's that the emulator lacks (a bucket's
storage layout). TensorFlow sends ``Transfer-Encoding: identity`` with empty bodies,
which Go answers with 501: the relay sends every body with its length instead, decoding the
chunked bodies of TensorFlow's uploads. ``X-Forwarded-Proto: https`` makes the URLs the emulator
builds from the Host header https ones: the session of a resumable upload then comes back through
the proxy. The Host header itself passes unchanged: the emulator serves its JSON API paths
(``/storage/v1/...``, ``/upload/storage/v1/...``) for any host, and takes a request whose Host is
its public host (storage.googleapis.com by default) as a path-style read ``/<bucket>/<object>``.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import json
import re
import socket
import socketserver
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

GOOGLE_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
# Virtual-hosted reads (<bucket>.storage.googleapis.com) are covered by the certificate too.
_BUCKET_HOST_SUFFIX = ".storage.googleapis.com"
# How long a request to the emulator may take.
_TIMEOUT = 60.0
_MAX_LINE = 65536
# A bucket's storage layout, which TensorFlow asks for before it renames a folder (to learn
# whether the bucket has a hierarchical namespace). fake-gcs-server has no such endpoint, so the
# relay answers it: a flat namespace, for a bucket the emulator has.
_STORAGE_LAYOUT = re.compile(r"/storage/v1/b/([^/?]+)/storageLayout(?:\?.*)?")


@dataclass(frozen=True)
class Certificates:
    """PEM files: the test authority (what clients trust) and the server's chain and key."""

    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path) -> Certificates:
    """A throw-away certificate authority and a server certificate it signs for Google's storage
    hosts, written into ``folder``. The keys live only there, for this test run."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    # A day's margin each side: the clocks of the test process and of the client agree anyway.
    not_before, not_after = now - datetime.timedelta(days=1), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kdjax test storage CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder()
          .subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    names = [*GOOGLE_HOSTS, "*" + _BUCKET_HOST_SUFFIX]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, GOOGLE_HOSTS[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    folder.mkdir(parents=True, exist_ok=True)
    files = Certificates(ca=folder / "ca.pem", cert=folder / "server.pem",
                         key=folder / "server-key.pem")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return files


def is_google_storage_host(host: str) -> bool:
    host = host.lower()
    return host in GOOGLE_HOSTS or host.endswith(_BUCKET_HOST_SUFFIX)


class TlsProxy(socketserver.ThreadingTCPServer):
    """The proxy on 127.0.0.1 (:attr:`url`), relaying to the emulator at ``upstream`` (its
    ``http://host:port``); :meth:`stop` closes it and every open connection.

    ``tunnels`` and ``refused`` list the ``CONNECT`` targets it served and turned away, in order.
    A request other than ``CONNECT`` is answered 501 by the HTTP server itself.
    """

    # stop() ends every connection, then waits for their threads.
    daemon_threads = False
    block_on_close = True

    def __init__(self, upstream: str, certificates: Certificates):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream = upstream.rstrip("/")
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certificates.cert, certificates.key)
        # The relay speaks HTTP/1.1 only, as the emulator does.
        self.context.set_alpn_protocols(["http/1.1"])
        self.tunnels: list[str] = []
        self.refused: list[str] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        # Registered here, in the accepting thread, so that stop() cannot miss a connection whose
        # thread has not started yet.
        with self._lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def start_tls(self, connection: socket.socket) -> ssl.SSLSocket:
        """``connection`` wrapped for TLS (handshake not done): the wrapper takes over its file
        descriptor, so it takes its place among the connections that stop() ends."""
        with self._lock:
            tls = self.context.wrap_socket(connection, server_side=True,
                                           do_handshake_on_connect=False)
            self._connections.discard(connection)
            self._connections.add(tls)
        return tls

    def forget(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.discard(connection)

    def stop(self) -> None:
        self.shutdown()
        with self._lock:
            for connection in self._connections:
                try:
                    # socket.socket's own shutdown: an SSLSocket's would drop its SSL state under
                    # the thread that is reading it. Either way the reader wakes up to an end of
                    # stream and its handler returns.
                    socket.socket.shutdown(connection, socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its client
        self.server_close()


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One client connection to the proxy: a ``CONNECT`` to a Google storage host becomes a TLS
    connection whose requests :class:`_EmulatorHandler` serves."""

    server: TlsProxy
    protocol_version = "HTTP/1.1"

    def handle(self) -> None:
        try:
            super().handle()
        except OSError:
            pass  # the client went away, or stop() ended the connection
        finally:
            self.server.forget(self.connection)

    def do_CONNECT(self) -> None:
        host, _, port = self.path.rpartition(":")
        if port != "443" or not is_google_storage_host(host):
            self.server.refused.append(self.path)
            self.send_error(403, "this proxy only reaches the Cloud Storage emulator")
            return
        self.server.tunnels.append(self.path)
        self.send_response(200, "Connection established")
        self.end_headers()
        self.close_connection = True
        # The client starts the TLS handshake only once it has read the 200, so none of it waits
        # in rfile's buffer: the handshake reads the socket itself.
        tls = self.server.start_tls(self.connection)
        try:
            tls.do_handshake()
            _EmulatorHandler(tls, self.client_address, self.server)
        finally:
            self.server.forget(tls)
            tls.close()

    def log_message(self, format, *args) -> None:
        pass  # a line per request would bury the test's own output


# Headers about one connection end at the relay. Transfer-Encoding and Content-Length among
# them: bodies go on with a Content-Length of their own (see the module's docstring). Expect: the
# relay answers "100 Continue" itself and sends the emulator the whole body at once.
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authorization",
                         "te", "trailer", "transfer-encoding", "upgrade", "expect",
                         "content-length"})


class _EmulatorHandler(http.server.BaseHTTPRequestHandler):
    """The HTTP requests inside one TLS tunnel, each sent on to the emulator (changed as the
    module's docstring says) and its response sent back."""

    server: TlsProxy
    protocol_version = "HTTP/1.1"

    def handle(self) -> None:
        try:
            super().handle()
        except (OSError, ValueError):
            pass  # the client closed the tunnel or sent a malformed chunk; or stop() ended it

    def _forward(self) -> None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._read_chunked()
        else:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        headers["X-Forwarded-Proto"] = "https"
        layout = _STORAGE_LAYOUT.fullmatch(self.path)
        if layout and self.command == "GET":
            response, content = self._emulator("GET", f"/storage/v1/b/{layout[1]}", b"", headers)
            if response.status == 200:
                content = json.dumps({"kind": "storage#storageLayout", "bucket": layout[1],
                                      "location": json.loads(content)["location"]}).encode()
        else:
            response, content = self._emulator(self.command, self.path, body, headers)
        # The emulator's own status line and headers, without the relay's Server and Date.
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        bodiless = self.command == "HEAD" or response.status in (204, 304)
        if bodiless and response.getheader("Content-Length") is not None:
            # The length of what a GET would return: clients read the object's size from it.
            self.send_header("Content-Length", response.getheader("Content-Length"))
        elif not bodiless:
            self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        if not bodiless:
            self.wfile.write(content)

    def _emulator(self, method: str, path: str, body: bytes, headers: dict[str, str]
                  ) -> tuple[http.client.HTTPResponse, bytes]:
        """The emulator's response to one request, and its whole body."""
        address = urllib.parse.urlsplit(self.server.upstream)
        upstream = http.client.HTTPConnection(address.hostname, address.port, timeout=_TIMEOUT)
        try:
            # http.client sets Content-Length from the body (0 for an empty POST or PUT).
            upstream.request(method, path, body, headers)
            response = upstream.getresponse()
            return response, response.read()
        finally:
            upstream.close()

    def _read_chunked(self) -> bytes:
        """A chunked request body, decoded: TensorFlow's uploads of data send their bodies so."""
        chunks = []
        while size := int(self.rfile.readline(_MAX_LINE).split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline(_MAX_LINE)  # the CRLF that ends the chunk
        while self.rfile.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
            pass  # trailer fields, which the emulator has no use for
        return b"".join(chunks)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format, *args) -> None:
        pass
