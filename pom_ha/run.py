"""``python -m pom_ha.run DAEMON [ARGS...]``: run one daemon (``services.<daemon>``) in this process without
loading the whole command line first. The systemd units start daemons this way (half the start-up of
``pom-ha run DAEMON``, which loads every CLI group before it execs the same module)."""

from __future__ import annotations

import importlib.util
import runpy
import sys


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: python -m pom_ha.run DAEMON [ARGS...]", file=sys.stderr)
        return 2
    module = "services." + argv[0].replace("-", "_")
    if importlib.util.find_spec(module) is None:
        print(f"error: unknown daemon {argv[0]!r}", file=sys.stderr)
        return 2
    sys.argv = [module, *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
