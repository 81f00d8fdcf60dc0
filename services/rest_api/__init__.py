"""The REST API daemon: ``pom-ha run rest-api --server pomN`` (see docs/rest-api.md)."""
