"""Campaign administration and the fenced runners the Common Campaign Director executes.

- ``admin``       operator requests: campaigns, contact lists, imports, campaign starts, job commands,
                  exports, purge schedules — validated first, each written in one transaction
- ``imports``     the resumable import runner (CSV file or database table) run by the Common CD master
- ``fenced_tx``   a transaction that holds a lease fence for its whole duration
- ``schedule``    pure: when a schedule fires, how late, and its next occurrence
- ``allocation``  pure: which Campaign Manager is least busy
- ``cli``         the ``pom-ha campaign | list | job`` commands
"""
