"""The lab's public key infrastructure: one CA per lab, leaf certificates for servers and clients, and the
PKCS12 / JKS stores the Java servers read. Kafka, the desktop port and every later TLS user import it from here.

- :mod:`pom_ha.pki.files`: :class:`Pki` (the files of one TLS folder), :func:`lab_pki`, :class:`PkiError`;
- :mod:`pom_ha.pki.issue`: :func:`ensure_pki` (CA, truststore, one keystore per server, the client's stores),
  :func:`client_ssl_context`.
"""

from pom_ha.pki.files import CA_NAME, CERT_DAYS, CLIENT_NAME, TRUST_ALIAS, Pki, PkiError, lab_pki, require
from pom_ha.pki.issue import client_ssl_context, ensure_pki, issue_leaf, load_ca

__all__ = [
    "CA_NAME", "CERT_DAYS", "CLIENT_NAME", "TRUST_ALIAS", "Pki", "PkiError", "client_ssl_context", "ensure_pki",
    "issue_leaf", "lab_pki", "load_ca", "require",
]
