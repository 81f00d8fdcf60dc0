"""Campaign administration and the fenced runners the Common Campaign Director executes.

- ``admin``       operator requests: campaigns, contact lists, imports, campaign starts, job commands,
                  exports, purge schedules — validated first, each written in one transaction
- ``imports``     the resumable import runner (CSV file or database table) run by the Common CD master
- ``fenced_tx``   a transaction that holds a lease fence for its whole duration
- ``schedule``    pure: when a schedule fires, how late, and its next occurrence
- ``allocation``  pure: which Campaign Manager is least busy
- ``cli``         the ``pom-ha campaign | list | job`` commands
- ``service``     campaign administration (campaigns, lists, DNC, strategies, calendars, recurring schedules),
                  behind ``admin_cli`` (``pom-ha campaign | list | dnc | strategy | schedule``) and the REST
                  routes of ``pom_ha.web.admin_routes`` (docs/campaign-admin.md)
- ``recurrence``  pure: rrule / cron occurrences in a zone, holiday calendars
"""
