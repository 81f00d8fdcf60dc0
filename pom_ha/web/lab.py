"""The lab's console: HTTPS certificates from the lab CA, and the demo administrator.

* :func:`web_certs` issues one server certificate per POM server (SAN: its address and name) with the
  lab's CA (:mod:`pom_ha.pki`, ``<lab dir>/ssl``) into ``<lab dir>/web-tls/<server>.pem|.key``; a key
  is mode 0600 and owned by the server's uid (its web daemon reads it). The topology then says
  ``[web] tls_cert = ".../{server}.pem"``: each daemon fills in its own name.
* :func:`ensure_demo_admin` creates the user ``admin`` once, with a random password written to
  ``<lab dir>/console-admin-password`` (mode 0600) and returned to be printed once.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from pathlib import Path

import asyncpg
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from pom_ha.config import Topology
from pom_ha.pki.files import lab_pki, write_private
from pom_ha.pki.issue import ensure_pki, issue_leaf, load_ca
from pom_ha.web import auth

DEMO_ADMIN = "admin"


def cert_paths(topo: Topology) -> tuple[str, str]:
    folder = topo.lab_dir() / "web-tls"
    return str(folder / "{server}.pem"), str(folder / "{server}.key")


def web_certs(topo: Topology, *, chown: bool = True) -> Topology:
    """Certificates for every server's web daemon (existing ones are kept); the topology with TLS on."""
    pki = lab_pki(topo)
    ensure_pki(pki, [])
    ca = load_ca(pki)
    folder = topo.lab_dir() / "web-tls"
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    ca_copy = folder / "ca.pem"
    ca_copy.write_bytes(pki.ca_cert.read_bytes())
    ca_copy.chmod(0o644)
    cert_t, key_t = cert_paths(topo)
    for server in topo.servers:
        cert_path, key_path = Path(cert_t.format(server=server.name)), Path(key_t.format(server=server.name))
        if not (cert_path.exists() and key_path.exists()):
            key = ec.generate_private_key(ec.SECP256R1())
            sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(server.address)),
                                            x509.DNSName(server.name)]
            cert = issue_leaf(server.name, key, ca, sans=sans, usages=[ExtendedKeyUsageOID.SERVER_AUTH])
            write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
            chain = cert.public_bytes(serialization.Encoding.PEM) + ca[0].public_bytes(serialization.Encoding.PEM)
            cert_path.write_bytes(chain)
            cert_path.chmod(0o644)
        if chown and os.geteuid() == 0:
            uid = topo.server_uid(server.name)
            os.chown(key_path, uid, uid)
    web = topo.web.model_copy(update={"tls_cert": cert_t, "tls_key": key_t})
    return topo.model_copy(update={"web": web})


def password_file(topo: Topology) -> Path:
    return topo.lab_dir() / "console-admin-password"


async def ensure_demo_admin(topo: Topology) -> str | None:
    """Create the lab's ``admin`` (once). Returns its password when it was just made, else None."""
    conn = await asyncpg.connect(topo.postgres.dsn(), timeout=5)
    try:
        if await conn.fetchval("SELECT 1 FROM web_users WHERE name = $1", DEMO_ADMIN):
            return None
        password = secrets.token_urlsafe(12)
        await auth.add_user(conn, DEMO_ADMIN, "admin", password)
        await auth.audit(conn, actor="lab", role=None, via="cli", address="local", server="", action="user_add",
                         target=DEMO_ADMIN, result="ok", detail={"role": "admin", "demo": True})
    finally:
        await conn.close()
    write_private(password_file(topo), (password + "\n").encode())
    return password
