"""Mutual TLS for the Event SDK cluster: the brokers' SSL settings and the client settings every Kafka client of
pom-ha uses when the topology says ``[kafka] ssl = true``. The CA, the certificates and the stores themselves are
the lab's PKI (:mod:`pom_ha.pki`); the names it exports are importable from here too, for the Kafka callers.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pom_ha.config import Topology
from pom_ha.pki import CA_NAME as CA_NAME
from pom_ha.pki import CERT_DAYS as CERT_DAYS
from pom_ha.pki import CLIENT_NAME as CLIENT_NAME
from pom_ha.pki import TRUST_ALIAS as TRUST_ALIAS
from pom_ha.pki import Pki, client_ssl_context, lab_pki, require
from pom_ha.pki import PkiError as KafkaTlsError
from pom_ha.pki import ensure_pki as ensure_pki

__all__ = [
    "CA_NAME", "CERT_DAYS", "CLIENT_NAME", "TRUST_ALIAS", "KafkaTlsError", "Pki", "broker_ssl_properties",
    "ensure_pki", "lab_pki", "security_config", "ssl_context",
]


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


def security_config(topo: Topology, pki: Pki | None = None) -> dict[str, str]:
    """confluent-kafka (librdkafka) security settings for ``topo``: empty for plaintext, mutual TLS with
    the lab's client certificate when ``[kafka] ssl = true``. Merge it into every client's config."""
    if not topo.kafka.ssl:
        return {}
    pki = pki or lab_pki(topo)
    return {
        "security.protocol": "SSL",
        "ssl.ca.location": str(require(pki.ca_cert)),
        "ssl.certificate.location": str(require(pki.client_cert)),
        "ssl.key.location": str(require(pki.client_key)),
        "ssl.key.password": pki.password(),
        # brokers' certificates carry their IP address: check it
        "ssl.endpoint.identification.algorithm": "https",
    }


def ssl_context(topo: Topology, pki: Pki | None = None) -> ssl.SSLContext:
    """A Python client context that trusts the lab CA and presents the client certificate."""
    return client_ssl_context(pki or lab_pki(topo))
