"""Chaos testing of pom-ha: a deterministic simulation of the HA core (``pom_ha.chaos.sim``)."""
