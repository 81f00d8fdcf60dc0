"""TLS on the desktop port: contexts from the lab CA's certificates, errors naming the file, a TLS round trip."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from pom_ha.desktop.tls import DesktopTlsError, client_context, lab_desktop_pem, server_context
from pom_ha.kafka.tls import Pki
from pom_ha.zones.sdk_link import SdkLinkError, request_sdk_lost


@pytest.fixture
def pem(tmp_path: Path) -> tuple[Pki, Path, Path]:
    pki = Pki(tmp_path / "ssl")
    cert, key = lab_desktop_pem(pki, "pom1", "127.0.0.1", tmp_path / "desk")
    return pki, cert, key


def test_errors_name_the_file(tmp_path: Path, pem: tuple[Pki, Path, Path]) -> None:
    _pki, cert, key = pem
    with pytest.raises(DesktopTlsError, match=r"/nope/am\.pem: certificate file missing"):
        server_context("/nope/am.pem", key)
    with pytest.raises(DesktopTlsError, match=rf"{key}: not a PEM certificate"):
        server_context(key, key)
    other = tmp_path / "other.key"
    other.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DesktopTlsError, match=rf"{other}: not the PEM key of {cert}"):
        server_context(cert, other)
    with pytest.raises(DesktopTlsError, match=r"/nope/ca\.pem: CA certificate file missing"):
        client_context("/nope/ca.pem")
    with pytest.raises(DesktopTlsError, match=rf"{key}: not a PEM CA certificate"):
        client_context(key)


async def test_tls_round_trip_and_untrusted_client(pem: tuple[Pki, Path, Path]) -> None:
    pki, cert, key = pem
    assert key.stat().st_mode & 0o777 == 0o600

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context(cert, key))
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(pki.ca_cert))
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", port, ssl=ssl.create_default_context())
    finally:
        server.close()
        await server.wait_closed()


async def test_sdk_lost_refuses_unknown_names_before_the_database() -> None:
    from pom_ha.config import load_topology

    topo = load_topology()
    with pytest.raises(SdkLinkError, match="Atlantis"):
        await request_sdk_lost(topo, zones=["Atlantis"])
    with pytest.raises(SdkLinkError, match="pom9"):
        await request_sdk_lost(topo, server="pom9")
    with pytest.raises(SdkLinkError, match="pom9"):
        await request_sdk_lost(topo, zones=["Default"], to="pom9")
    with pytest.raises(SdkLinkError, match="--zone"):
        await request_sdk_lost(topo)
