"""Chaos testing of pom-ha.

On real processes (and containers): faults (``faults``), the survivability plan (``plan``), the runner
(``runner``), the JSONL history (``history``) and the independent history checker (``checker``). Without any
server: a deterministic simulation of the HA core (``sim``, ``simulate``).
"""
