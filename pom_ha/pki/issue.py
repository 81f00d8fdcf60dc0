"""Issuing the lab's certificates: the self-signed CA, leaf certificates signed by it, the PKCS12 key stores and the
Java truststore (:func:`ensure_pki`), and a Python client context presenting the client certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
import ssl
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pom_ha.pki.files import CA_NAME, CERT_DAYS, CLIENT_NAME, TRUST_ALIAS, Pki, PkiError, require, write_private


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pom-ha"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue_leaf(
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


def load_ca(pki: Pki) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    except (OSError, ValueError) as exc:
        raise PkiError(f"{pki.ca_cert}: cannot load the CA certificate ({exc})") from None
    try:
        key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), pki.password().encode())
    except (OSError, ValueError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "wrong password or not a PEM key"
        raise PkiError(f"{pki.ca_key}: cannot load the CA key ({reason})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{pki.ca_key}: the CA key is not an EC key")
    return cert, key


def ensure_pki(pki: Pki, brokers: Iterable[tuple[str, str]]) -> list[Path]:
    """Create whatever is missing of the CA, truststore, client stores and one keystore per broker
    (``brokers``: (server name, IP address)); returns the files written. Existing files are kept, so
    every broker of a cluster keeps trusting the same CA."""
    written: list[Path] = []
    pki.dir.mkdir(parents=True, exist_ok=True)
    pki.dir.chmod(0o700)
    if not pki.password_file.exists():
        write_private(pki.password_file, (secrets.token_urlsafe(24) + "\n").encode())
        written.append(pki.password_file)
    password = pki.password().encode()
    enc = serialization.BestAvailableEncryption(password)
    if not pki.ca_cert.exists() or not pki.ca_key.exists():
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = issue_leaf(CA_NAME, ca_key, None)
        write_private(pki.ca_key, ca_key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.PKCS8, enc))
        write_private(pki.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
        written += [pki.ca_key, pki.ca_cert]
        for stale in pki.dir.glob("*.p12"):  # issued by a CA that is gone
            stale.unlink()
    ca = load_ca(pki)
    if not pki.truststore.exists():
        trusted = pkcs12.PKCS12Certificate(ca[0], TRUST_ALIAS.encode())
        write_private(pki.truststore, pkcs12.serialize_java_truststore([trusted], enc))
        written.append(pki.truststore)
    for server, address in brokers:
        path = pki.keystore(server)
        if path.exists():
            continue
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(address)), x509.DNSName(server)]
        cert = issue_leaf(server, key, ca, sans=sans,
                      usages=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        write_private(path, pkcs12.serialize_key_and_certificates(server.encode(), key, cert, [ca[0]], enc))
        written.append(path)
    if not pki.client_keystore.exists() or not pki.client_cert.exists() or not pki.client_key.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue_leaf(CLIENT_NAME, key, ca, usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
        write_private(pki.client_key, key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8, enc))
        write_private(pki.client_cert, cert.public_bytes(serialization.Encoding.PEM))
        write_private(pki.client_keystore,
                       pkcs12.serialize_key_and_certificates(CLIENT_NAME.encode(), key, cert, [ca[0]], enc))
        written += [pki.client_key, pki.client_cert, pki.client_keystore]
    return written


def client_ssl_context(pki: Pki) -> ssl.SSLContext:
    """A Python client context that trusts the CA of ``pki`` and presents its client certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(require(pki.ca_cert)))
    try:
        ctx.load_cert_chain(str(require(pki.client_cert)), str(require(pki.client_key)), password=pki.password())
    except ssl.SSLError as exc:
        raise PkiError(f"{pki.client_key}: cannot load the client key ({exc.reason})") from None
    return ctx
