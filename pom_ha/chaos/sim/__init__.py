"""Deterministic simulation of the HA core (FoundationDB's way of testing): the real electors, the fake
status store, a virtual clock and a seeded scheduler, through random fault schedules."""

from pom_ha.chaos.sim.bugs import KNOWN_BUGS, check_bugs
from pom_ha.chaos.sim.world import ScheduleResult, SimConfig, Violation, run_schedule

__all__ = ["KNOWN_BUGS", "ScheduleResult", "SimConfig", "Violation", "check_bugs", "run_schedule"]
