"""A transaction fenced for its whole duration: several statements accepted only under one epoch.

:func:`pom_ha.ha.fencing.execute_fenced` fences ONE statement. An import batch (contacts, rejected lines
and the checkpoint) must commit together or not at all, so this opens a transaction whose first
statement takes the fence row ``FOR SHARE``: a takeover (an UPDATE of that ``ha_lease`` row) waits until
the transaction ends, and a transaction that starts after a takeover finds no row at the old epoch and is
rolled back without writing anything::

    async with fenced_transaction(conn, LeaseFence("campaign_director", "", term.epoch)):
        await conn.copy_records_to_table(...)
        await conn.execute("UPDATE data_imports SET checkpoint = $1 WHERE id = $2", ...)
"""

from __future__ import annotations

from pom_ha.ha.fencing import FenceLost as FenceLost  # their home is pom_ha.ha.fencing
from pom_ha.ha.fencing import fenced_transaction as fenced_transaction
