"""Agent Manager: per-zone MASTER/DORMANT, the desktop server, Table 9 on takeover (docs/agent-manager.md)."""
