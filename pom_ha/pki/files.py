"""The files of one TLS folder (``<lab dir>/ssl``, or ``<out>/ssl`` for ``kafka enable-ha --out``):

- ``ca.pem`` / ``ca.key``: the CA (the key never leaves this folder, mode 0600);
- ``truststore.p12``: a Java truststore with the CA, shared by every server;
- ``<server>.keystore.p12``: one server's key and certificate chain (SAN = its IP address and name);
- ``client.pem`` / ``client.key`` / ``client.keystore.p12``: the certificate pom-ha's clients present;
- ``store-password``: the one password of every store and of the client key (mode 0600).

Passwords are read from that file and never printed or logged. Errors name the file at fault.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pom_ha.config import Topology

#: lifetime of every certificate the lab issues
CERT_DAYS = 825
CLIENT_NAME = "pom-ha-client"
CA_NAME = "pom-ha lab CA"
TRUST_ALIAS = "pom-ha-ca"


class PkiError(Exception):
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
            raise PkiError(f"{self.password_file}: cannot read the store password ({exc.strerror})") from None
        if not value:
            raise PkiError(f"{self.password_file}: the store password file is empty")
        return value


def lab_pki(topo: Topology, root: Path | None = None) -> Pki:
    """The TLS folder of a lab (``root`` defaults to the topology's lab dir)."""
    return Pki((root or topo.lab_dir()) / "ssl")


def write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)


def require(path: Path) -> Path:
    """``path`` if it is a file; else a :class:`PkiError` that says how to create it."""
    if not path.is_file():
        raise PkiError(f"{path}: missing (run `pom-ha kafka enable-ha --ssl` or start the lab in SSL mode)")
    return path
