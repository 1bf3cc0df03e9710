"""The Store: one facade over the objects that run every query backburner has, one per concern.

    store.generations   submit, get, cancel, record_realtime, count_by_state     (API side)
    store.work          claim, heartbeat, finish, release, recover_lost, expire_overdue
    store.groups        submit, get, cancel
    store.batches       create, get, list, cancel, retry, results, render_file   (API side)
    store.batch_runs    claim, renew, release, fail, start, load_chunk, finalize (batch runner)
    store.files         create, get, list, delete
    store.webhooks      create, list, get, exists, update, delete                (endpoints)
    store.outbox        enqueue_test, claim, record_attempt, attempts, redeliver, count_by_state
    store.keys          create, tenant_for, any_created, list, revoke               (API keys)
    store.tenants       admit, check_realtime, create, list, get, update, hold   (limits, weights)
    store.usage         add, report, tokens_on                  (tokens and requests per day)
    store.idempotency   answer, save                                            (Idempotency-Key)
    store.retention     purge                          (maintenance: what is old enough goes)
    store.deadlines     pace, open_work                 (estimates and work at risk)
    store.views         queue_depth, groups, batches, lines, deliveries  (the dashboard reads)

They share one :class:`~backburner.store.base.Database` (the writer and reader engines). What
happens when generations finish (group and batch counters, webhook events) is in one place,
:class:`~backburner.store.terminal.Terminal`, which every object that makes generations terminal
calls in its own transaction. Callers get schema records, never rows.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from backburner.schemas.tenants import Limits
from backburner.store.base import Database
from backburner.store.batch_runs import BatchRuns
from backburner.store.batches import Batches
from backburner.store.deadlines import Deadlines
from backburner.store.files import Files
from backburner.store.generations import Generations
from backburner.store.groups import Groups
from backburner.store.idempotency import IdempotencyKeys
from backburner.store.keys import Keys
from backburner.store.outbox import Outbox
from backburner.store.retention import Retention
from backburner.store.tenants import Tenants
from backburner.store.terminal import Terminal
from backburner.store.usage import Usage
from backburner.store.views import Views
from backburner.store.webhooks import Webhooks
from backburner.store.work import Work


class Store:
    def __init__(self, url: str, limits: Limits | None = None) -> None:
        self._db = db = Database(url)
        self.url = url
        self.sqlite = db.sqlite
        self.keys = Keys(db)
        self.idempotency = IdempotencyKeys(db)
        self.webhooks = Webhooks(db)
        self.outbox = Outbox(db, self.webhooks)
        terminal = Terminal(self.outbox, db)
        self.usage = Usage(db)
        self.tenants = Tenants(db, self.usage, limits)
        self.generations = Generations(db, terminal, self.idempotency, self.tenants)
        self.work = Work(db, terminal, self.idempotency, self.usage)
        self.groups = Groups(db, terminal, self.idempotency, self.tenants)
        self.batches = Batches(db, terminal, self.tenants)
        self.batch_runs = BatchRuns(db, terminal, self.tenants)
        self.files = Files(db, self.idempotency)
        self.retention = Retention(db)
        self.deadlines = Deadlines(db)
        self.views = Views(db)

    @property
    def engine(self) -> AsyncEngine:
        """The writer engine (tests and migrations use it directly)."""
        return self._db.writer

    async def close(self) -> None:
        await self._db.close()

    async def ping(self) -> None:
        await self._db.ping()
