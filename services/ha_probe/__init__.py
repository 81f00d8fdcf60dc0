"""ha-probe: a daemon that holds an HA role and, while master, makes fenced writes (``ha_probe_write``).

It exercises the HA core end to end: election, heartbeats, fencing, graceful stop. The history checker
and the failover benchmarks read its rows and ``ha_event``.
"""
