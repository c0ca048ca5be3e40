"""HTTPS through the pinned connection, against a real TLS server on 127.0.0.1.

The fetcher connects to the address the SSRF guard checked and must still send SNI and verify the
certificate against the URL's host name, not the address. The tests trust a self-signed
certificate made here through ``SSL_CERT_FILE``, which ``ssl.create_default_context`` reads.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bm6b.filters.download import FetchConfig, Fetcher

HOST = "images.test"
BODY = b"\xff\xd8\xff\xe0" + b"\x00" * 60 + b"\xff\xd9"  # JPEG magic bytes are enough for the sniffer


def write_certificate(folder, names: list[str]):
    """Write a self-signed certificate for ``names`` (DNS names) and 127.0.0.1, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    alt_names = [x509.DNSName(name) for name in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = folder / "cert.pem"
    key_path = folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.server.request_hosts.append(self.headers.get("Host"))
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args):
        pass


@pytest.fixture
def tls_server(tmp_path):
    cert_path, key_path = write_certificate(tmp_path, [HOST])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server_names: list[str | None] = []
    context.sni_callback = lambda sock, name, ctx: server_names.append(name)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    httpd.request_hosts = []
    httpd.server_names = server_names
    httpd.cert_path = cert_path
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def fetch_once(host_map: dict[str, str], url: str):
    """Fetch ``url`` with a fresh fetcher whose test resolver maps host names to addresses."""
    config = FetchConfig(allow_networks=("127.0.0.0/8",), retries=0, deadline=10.0)
    fetcher = Fetcher(config, resolver=lambda host, port: [host_map[host]])
    try:
        return fetcher.fetch(url)
    finally:
        fetcher.close()


def test_https_fetch_sends_sni_and_verifies(tls_server, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.cert_path))
    port = tls_server.server_address[1]
    result = fetch_once({HOST: "127.0.0.1"}, f"https://{HOST}:{port}/cat.jpg")
    assert result.reason is None, result.detail
    assert result.body == BODY
    assert result.image_format == "JPEG"
    assert tls_server.server_names == [HOST]
    assert tls_server.request_hosts == [f"{HOST}:{port}"]


def test_https_certificate_for_other_host_is_rejected(tls_server, monkeypatch):
    # The pinned address serves a valid certificate, but for images.test, not for this host name.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.cert_path))
    port = tls_server.server_address[1]
    result = fetch_once({"other.test": "127.0.0.1"}, f"https://other.test:{port}/cat.jpg")
    assert result.reason == "connect"
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert "other.test" in result.detail
    assert tls_server.request_hosts == []


def test_https_untrusted_certificate_is_rejected(tls_server, tmp_path, monkeypatch):
    # Trust a different self-signed certificate, so the server's one has no known issuer.
    trusted_folder = tmp_path / "trusted"
    trusted_folder.mkdir()
    other_cert, _ = write_certificate(trusted_folder, ["unrelated.test"])
    monkeypatch.setenv("SSL_CERT_FILE", str(other_cert))
    port = tls_server.server_address[1]
    result = fetch_once({HOST: "127.0.0.1"}, f"https://{HOST}:{port}/cat.jpg")
    assert result.reason == "connect"
    assert "CERTIFICATE_VERIFY_FAILED" in result.detail
    assert tls_server.request_hosts == []


def test_https_keep_alive_reuses_connection(tls_server, monkeypatch):
    # TLS 1.3 servers send session tickets after the handshake. Once read, they must not make an
    # idle connection look like it has unread input, so three fetches share one handshake.
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.cert_path))
    port = tls_server.server_address[1]
    config = FetchConfig(allow_networks=("127.0.0.0/8",), retries=0, deadline=10.0)
    fetcher = Fetcher(config, resolver=lambda host, port: ["127.0.0.1"])

    results = [fetcher.fetch(f"https://{HOST}:{port}/cat{i}.jpg") for i in range(3)]
    fetcher.close()

    assert [result.body for result in results] == [BODY] * 3
    assert tls_server.server_names == [HOST]
