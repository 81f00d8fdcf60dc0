"""systemd readiness (``sd_notify``): a datagram to ``$NOTIFY_SOCKET`` when a unit runs us as ``Type=notify``.

The protocol is one ``KEY=VALUE`` line per field in one datagram on the unix socket systemd names in
``NOTIFY_SOCKET`` (an abstract socket when it starts with ``@``). Outside systemd the variable is unset and
every call is a no-op, so daemons call it unconditionally. ``READY=1`` tells systemd the unit is up (its
``After=`` dependants may start); ``STOPPING=1`` that a graceful stop began; ``STATUS=`` is shown by
``systemctl status``.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) to systemd; False when not under systemd or on error."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or not fields:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError:
        return False
    return True
