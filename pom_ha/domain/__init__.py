"""Pure domain of pom-ha: models and rules with no I/O.

Nothing here opens a socket, touches a database, sleeps or reads a clock: every function that needs the
current time takes it as an argument, so daemons decide *when* and these modules decide *what*.

- ``instants``        what an instant is here (timezone-aware UTC) and the check that enforces it
- ``contacts``        Contact (phone, time zone, custom fields) and ContactList
- ``contact_import``  streaming CSV / table import with per-row rejects and a resumable checkpoint
- ``jobs``            job states, events and the transition table
- ``attempts``        completion codes (system and custom), attempts, a contact's dialing history
- ``stats``           a job's counters as the Campaign Director and the pacers see them
- ``strategy``        retry strategy (what to do next with a contact) and finish criteria
- ``pacing``          the Pacer interface and the time-based token-bucket pacer
- ``rules``           the Rule Engine's rules: do-not-call, calling window, max attempts, minimum gap
- ``campaigns``       validated campaign definitions
- ``nuisance``        nuisance (abandoned-call) rate, trend buckets and the alarm decision
"""
