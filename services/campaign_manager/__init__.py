"""The Campaign Manager daemon (a pool member): runs the jobs the Campaign Director assigns to it.

``decisions`` (pure rules), ``job_store`` (fenced reads and writes of one job), ``completions`` (how
attempts end, takeover resolution), ``job_runner`` (one job's states and dial loop), ``daemon`` (the pool
member: assignments, shared Rule Engine and media clients, outcome routing), ``listen`` (LISTEN on
``ha_assignment``). The contract with the Campaign Director is in ``docs/campaign-manager.md``.
"""
