"""Mutual TLS for the Event SDK cluster: the lab's CA, the brokers' PKCS12 key and trust stores, and the
client settings every Kafka client of pom-ha uses when the topology says ``[kafka] ssl = true``.

One folder (``<lab dir>/ssl``, or ``<out>/ssl`` for ``kafka enable-ha --out``) holds everything:

- ``ca.pem`` / ``ca.key``: the CA (the key never leaves this folder, mode 0600);
- ``truststore.p12``: a Java truststore with the CA, shared by every broker;
- ``<server>.keystore.p12``: one broker's key and certificate chain (SAN = its IP address and name);
- ``client.pem`` / ``client.key`` / ``client.keystore.p12``: the certificate pom-ha's clients present;
- ``store-password``: the one password of every store and of the client key (mode 0600).

Passwords are read from that file and never printed or logged. Errors name the file at fault.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pom_ha.config import Topology

#: lifetime of every certificate the lab issues
CERT_DAYS = 825
CLIENT_NAME = "pom-ha-client"
CA_NAME = "pom-ha lab CA"
TRUST_ALIAS = "pom-ha-ca"


class KafkaTlsError(Exception):
    """A key store, certificate or password file is missing or unusable; the message names the file."""


@dataclass(frozen=True)
class Pki:
    """The files of one TLS folder (see the module docstring)."""

    dir: Path

    @property
    def ca_cert(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.dir / "ca.key"

    @property
    def truststore(self) -> Path:
        return self.dir / "truststore.p12"

    @property
    def password_file(self) -> Path:
        return self.dir / "store-password"

    def keystore(self, server: str) -> Path:
        return self.dir / f"{server}.keystore.p12"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client.key"

    @property
    def client_keystore(self) -> Path:
        return self.keystore("client")

    def password(self) -> str:
        try:
            value = self.password_file.read_text().strip()
        except OSError as exc:
            raise KafkaTlsError(f"{self.password_file}: cannot read the store password ({exc.strerror})") from None
        if not value:
            raise KafkaTlsError(f"{self.password_file}: the store password file is empty")
        return value


def lab_pki(topo: Topology, root: Path | None = None) -> Pki:
    """The TLS folder of a lab (``root`` defaults to the topology's lab dir)."""
    return Pki((root or topo.lab_dir()) / "ssl")


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pom-ha"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    sans: list[x509.GeneralName] | None = None,
    usages: list[x509.ObjectIdentifier] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:  # the self-signed CA
        builder = builder.issuer_name(_name(subject)).add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        return builder.sign(key, hashes.SHA256())
    ca_cert, ca_key = issuer
    builder = builder.issuer_name(ca_cert.subject).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    ).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _load_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise KafkaTlsError(f"{pki.ca_cert}: cannot load the CA certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), pki.password().encode())
    except (OSError, ValueError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "wrong password or not a PEM key"
        raise KafkaTlsError(f"{pki.ca_key}: cannot load the CA key ({reason})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KafkaTlsError(f"{pki.ca_key}: the CA key is not an EC key")
    return cert, key


def ensure_pki(pki: Pki, brokers: Iterable[tuple[str, str]]) -> list[Path]:
    """Create whatever is missing of the CA, truststore, client stores and one keystore per broker
    (``brokers``: (server name, IP address)); returns the files written. Existing files are kept, so
    every broker of a cluster keeps trusting the same CA."""
    written: list[Path] = []
    pki.dir.mkdir(parents=True, exist_ok=True)
    pki.dir.chmod(0o700)
    if not pki.password_file.exists():
        _write_private(pki.password_file, (secrets.token_urlsafe(24) + "\n").encode())
        written.append(pki.password_file)
    password = pki.password().encode()
    enc = serialization.BestAvailableEncryption(password)
    if not pki.ca_cert.exists() or not pki.ca_key.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue(CA_NAME, ca_key, None)
        _write_private(pki.ca_key, ca_key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8, enc))
        _write_private(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [pki.ca_key, pki.ca_cert]
        for stale in pki.dir.glob("*.p12"):  # issued by a CA that is gone
            stale.unlink()
    ca = _load_ca(pki)
    if not pki.truststore.exists():
        trusted = pkcs12.PKCS12Certificate(ca[0], TRUST_ALIAS.encode())
        _write_private(pki.truststore, pkcs12.serialize_java_truststore([trusted], enc))
        written.append(pki.truststore)
    for server, address in brokers:
        path = pki.keystore(server)
        if path.exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(address)), x509.DNSName(server)]
        cert = _issue(server, key, ca, sans=sans,
                      usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        _write_private(path, pkcs12.serialize_key_and_certificates(server.encode(), key, cert, [ca[0]], enc))
        written.append(path)
    if not pki.client_keystore.exists() or not pki.client_cert.exists() or not pki.client_key.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(CLIENT_NAME, key, ca, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
        _write_private(pki.client_key, key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8, enc))
        _write_private(pki.client_cert, cert.public_bytes(serialization.Encoding.PEM))
        _write_private(pki.client_keystore,
                       pkcs12.serialize_key_and_certificates(CLIENT_NAME.encode(), key, cert, [ca[0]], enc))
        written += [pki.client_key, pki.client_cert, pki.client_keystore]
    return written


def broker_ssl_properties(keystore: Path, truststore: Path, password: str) -> str:
    """The SSL block of one broker's server.properties (listeners themselves are rendered by the caller)."""
    return "\n".join(
        [
            "# mutual TLS: brokers and clients must present a certificate issued by the lab CA",
            "security.inter.broker.protocol=SSL",
            "ssl.client.auth=required",
            "ssl.keystore.type=PKCS12",
            f"ssl.keystore.location={keystore}",
            f"ssl.keystore.password={password}",
            f"ssl.key.password={password}",
            "ssl.truststore.type=PKCS12",
            f"ssl.truststore.location={truststore}",
            f"ssl.truststore.password={password}",
            "ssl.enabled.protocols=TLSv1.3,TLSv1.2",
            "ssl.endpoint.identification.algorithm=https",
        ]
    )


def _require(path: Path) -> Path:
    if not path.is_file():
        raise KafkaTlsError(f"{path}: missing (run `pom-ha kafka enable-ha --ssl` or start the lab in SSL mode)")
    return path


def security_config(topo: Topology, pki: Pki | None = None) -> dict[str, str]:
    """confluent-kafka (librdkafka) security settings for ``topo``: empty for plaintext, mutual TLS with
    the lab's client certificate when ``[kafka] ssl = true``. Merge it into every client's config."""
    if not topo.kafka.ssl:
        return {}
    pki = pki or lab_pki(topo)
    return {
        "security.protocol": "SSL",
        "ssl.ca.location": str(_require(pki.ca_cert)),
        "ssl.certificate.location": str(_require(pki.client_cert)),
        "ssl.key.location": str(_require(pki.client_key)),
        "ssl.key.password": pki.password(),
        # brokers' certificates carry their IP address: check it
        "ssl.endpoint.identification.algorithm": "https",
    }


def ssl_context(topo: Topology, pki: Pki | None = None) -> ssl.SSLContext:
    """A Python client context that trusts the lab CA and presents the client certificate."""
    pki = pki or lab_pki(topo)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(_require(pki.ca_cert)))
    try:
        ctx.load_cert_chain(str(_require(pki.client_cert)), str(_require(pki.client_key)), password=pki.password())
    except ssl.SSLError as exc:
        raise KafkaTlsError(f"{pki.client_key}: cannot load the client key ({exc.reason})") from None
    return ctx
