"""rule-engine: the singleton Rule Engine. While MASTER it answers Campaign Managers' EVALUATE requests
(do-not-call list, calling window in the contact's own zone, max attempts, minimum gap) over framed JSON on
its server's address and ``ports.rule_engine``, each reply stamped with its lease epoch; demoted, it closes
the listener and every connection at once. Protocol: ``docs/rule-engine-protocol.md``.
"""
