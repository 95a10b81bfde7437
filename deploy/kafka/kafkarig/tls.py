"""Test certificates for the secured listeners, made with the ``openssl`` command.

One private CA signs the broker's certificate (subject alternative names ``IP:127.0.0.1`` and
``DNS:localhost``, so clients keep hostname verification on) and one client certificate per
mutual-TLS user (``CN=<user>``). Everything is PEM: Kafka 4.x reads PEM key stores and trust
stores directly (``ssl.keystore.type=PEM``), and Python's ``ssl`` module reads PEM files, so no
JKS or PKCS#12 step is needed. Keys are unencrypted: these are throw-away test files.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: The broker certificate's names: the rig's listeners are on the loopback address.
BROKER_SANS = ("IP:127.0.0.1", "DNS:localhost")
DAYS = 30


class TlsError(RuntimeError):
    """openssl is missing or refused to make a certificate."""


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsError("openssl is not on PATH; it is needed to make the test certificates")
    proc = subprocess.run(
        [openssl, *args], cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise TlsError(f"openssl {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of one test PKI, all in ``directory``."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        """The CA certificate: the broker's trust store and the clients' ``cafile``."""
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.directory / "ca-key.pem"

    @property
    def broker_keystore(self) -> Path:
        """The broker's key followed by its certificate chain (Kafka's PEM key store layout)."""
        return self.directory / "broker-keystore.pem"

    def client_cert(self, user: str) -> Path:
        """The client certificate of ``user`` (subject ``CN=<user>``)."""
        return self.directory / f"{user}.pem"

    def client_key(self, user: str) -> Path:
        """The private key of ``user``'s client certificate."""
        return self.directory / f"{user}-key.pem"


def make_ca(directory: Path, name: str = "kafka-rig test CA") -> TlsFiles:
    """A new self-signed CA in ``directory`` (kept if one is already there)."""
    files = TlsFiles(Path(directory).resolve())
    files.directory.mkdir(parents=True, exist_ok=True)
    if files.ca_cert.is_file() and files.ca_key.is_file():
        return files
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        files.ca_key.name,
        "-out",
        files.ca_cert.name,
        "-days",
        str(DAYS),
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=files.directory,
    )
    return files


def _sign(files: TlsFiles, stem: str, subject: str, extensions: str) -> tuple[Path, Path]:
    """A key and a CA-signed certificate ``<stem>-key.pem`` / ``<stem>.pem``."""
    key, csr, cert = f"{stem}-key.pem", f"{stem}.csr", f"{stem}.pem"
    ext = files.directory / f"{stem}.ext"
    ext.write_text(extensions)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", subject,
        cwd=files.directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", files.ca_cert.name, "-CAkey", files.ca_key.name,
        "-CAcreateserial", "-out", cert, "-days", str(DAYS), "-extfile", ext.name,
        cwd=files.directory,
    )  # fmt: skip
    (files.directory / csr).unlink()
    ext.unlink()
    return files.directory / cert, files.directory / key


def make_broker_keystore(files: TlsFiles, sans: tuple[str, ...] = BROKER_SANS) -> Path:
    """The broker's PEM key store (kept if already made): its key, its cert, then the CA cert."""
    if files.broker_keystore.is_file():
        return files.broker_keystore
    cert, key = _sign(
        files,
        "broker",
        "/CN=kafka-rig broker",
        f"subjectAltName={','.join(sans)}\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    chain = key.read_text() + cert.read_text() + files.ca_cert.read_text()
    files.broker_keystore.write_text(chain)
    return files.broker_keystore


def make_client_cert(files: TlsFiles, user: str) -> tuple[Path, Path]:
    """A client certificate ``CN=<user>`` for mutual TLS (kept if already made): (cert, key)."""
    if files.client_cert(user).is_file() and files.client_key(user).is_file():
        return files.client_cert(user), files.client_key(user)
    return _sign(files, user, f"/CN={user}", "extendedKeyUsage=clientAuth\n")


def make_pki(directory: Path, users: tuple[str, ...] = ()) -> TlsFiles:
    """A CA, the broker's key store and a client certificate per user, in ``directory``."""
    files = make_ca(directory)
    make_broker_keystore(files)
    for user in users:
        make_client_cert(files, user)
    return files
