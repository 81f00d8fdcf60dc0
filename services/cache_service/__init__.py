"""The Cache service: one per POM server, supervising that server's Ignite node (see docs/cache-service.md)."""
