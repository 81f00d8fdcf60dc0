"""Agent desktops: the desktop protocol (``protocol``) and the desktop client and bot agent (``client``)."""
