"""Chaos testing on real processes: faults (``faults``), the survivability plan (``plan``), the runner
(``runner``), the JSONL history (``history``) and the independent history checker (``checker``)."""
