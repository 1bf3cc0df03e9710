"""The fault scenarios of issue #10, one module each. Each is a bounded run on loopback (real
``backburner serve`` / ``worker`` processes, ``tests/support/upstream.py`` as the engine) that
returns a :class:`~tests.support.faults.common.Report`: its figures and every broken promise it
found (an empty ``problems`` list is a pass). ``tests/acceptance/test_faults.py`` runs them small
on SQLite and PostgreSQL on every CI run; ``bench/faults.py`` runs them full size for
docs/reliability.md.

1. :mod:`.kill`: SIGKILL a ``backburner worker`` K times mid-drain, restarting it each time.
2. :mod:`.flaky`: an upstream that fails 30 % of requests (5xx, resets, timeouts).
3. :mod:`.webhooks`: the webhook receiver is down for a while, then up.
4. :mod:`.postgres`: the PostgreSQL server stops mid-drain and starts again.
5. :mod:`.poison`: poison batch lines and poison engine answers inside a normal drain.
"""
