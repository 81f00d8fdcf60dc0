"""TLS on the desktop port (docs/desktop-protocol.md §Transport): the Agent Manager's server context from a PEM
certificate (chain) and key, the desktop's client context from the CA that issued it, and the lab's certificates.

The lab's certificates come from the lab CA of ``pom_ha.pki`` (``ensure_pki``: one CA per lab, a
certificate per server with its IP address as SAN); :func:`lab_desktop_pem` writes a server's certificate and key
from its keystore as PEM files an AM running under the server's uid can read. Every error names the file at fault.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from pom_ha.pki import Pki, ensure_pki


class DesktopTlsError(Exception):
    """A certificate, key or CA file is missing or unusable; the message names the file."""


def _readable(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DesktopTlsError(f"{path}: {what} file missing")
    if not os.access(path, os.R_OK):
        raise DesktopTlsError(f"{path}: {what} file not readable by uid {os.getuid()}")
    return path


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """The AM's desktop-port context: ``cert`` (PEM, the server certificate first, then its chain), ``key``
    (PEM, unencrypted). TLS 1.2 or later."""
    cert_path, key_path = _readable(Path(cert), "certificate"), _readable(Path(key), "key")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cert_path), str(key_path))
    except ssl.SSLError as exc:
        # tell a bad certificate from a bad / mismatched key
        try:
            ssl.create_default_context().load_verify_locations(cafile=str(cert_path))
        except ssl.SSLError:
            raise DesktopTlsError(f"{cert_path}: not a PEM certificate ({exc.reason})") from None
        raise DesktopTlsError(f"{key_path}: not the PEM key of {cert_path} ({exc.reason})") from None
    return ctx


def client_context(ca: str | Path) -> ssl.SSLContext:
    """A desktop's context: trusts ``ca`` (PEM) and checks that the AM's certificate names the address dialled."""
    ca_path = _readable(Path(ca), "CA certificate")
    try:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_path))
    except ssl.SSLError as exc:
        raise DesktopTlsError(f"{ca_path}: not a PEM CA certificate ({exc.reason})") from None


def lab_desktop_pem(pki: Pki, server: str, address: str, out_dir: Path, *, uid: int | None = None
                    ) -> tuple[Path, Path]:
    """``<out_dir>/<server>.desktop.pem`` (certificate + CA) and ``.key`` from the lab CA (created if missing);
    the key is mode 0600, owned by ``uid`` when given (the AM runs under its server's uid)."""
    ensure_pki(pki, [(server, address)])
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(pki.keystore(server).read_bytes(),
                                                             pki.password().encode())
    except (OSError, ValueError) as exc:
        raise DesktopTlsError(f"{pki.keystore(server)}: cannot load the server keystore ({exc})") from None
    if key is None or cert is None:
        raise DesktopTlsError(f"{pki.keystore(server)}: no key or certificate in the keystore")
    out_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out_dir / f"{server}.desktop.pem", out_dir / f"{server}.desktop.key"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in [cert, *chain]))
    cert_path.chmod(0o644)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    if uid is not None:
        os.chown(key_path, uid, uid)
    return cert_path, key_path
