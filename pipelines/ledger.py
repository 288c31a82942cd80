"""The deletion-request ledger: requests arrive over time; a scheduled job processes them.

A real database through SQLAlchemy: SQLite by default (`sqlite:///requests.db` in the
working directory) or PostgreSQL (`postgresql+psycopg://...`), via `--ledger` or
`AMNESIS_LEDGER_URL`. Opening a ledger migrates its schema to this version's
(`pipelines.ledger_migrations`, Alembic), so a ledger made by one version opens in the next.

A request is `pending` until a batch takes it (`processing`), then `done` with the model
version that no longer contains its ids, or `failed` with the batch's reason. A pending
request can be `rejected` (`unlearn requests reject N --reason ...`), and the job rejects a
request whose ids are not in the data. Each final state has a `finished_at` and a `note`.

Exactly once. `process` runs in three steps, each safe to interrupt:

1. claim (one transaction): if a batch is `processing` and its owner is alive, stop (two
   jobs never work on the same requests, and never fork the model's lineage); if its owner
   is dead, resume that batch; otherwise open a new batch and move every `pending` request
   into it. On PostgreSQL the requests are taken with `SELECT ... FOR UPDATE SKIP LOCKED`
   (rows another transaction holds, e.g. a reject in progress, are left for later) and a
   unique index admits one `processing` batch, so a second claimer fails instead of opening
   another; SQLite has no row locks and takes its database write lock at BEGIN;
2. unlearn the union of the batch's ids from the registry's current version and register the
   result, tagged with the batch id. Before unlearning, the registry is asked for a version
   with that tag: if an interrupted run already registered one, it is adopted instead of
   unlearning again (nothing is applied twice);
3. finish (one transaction): the batch and its requests become `done` with the new version.

A batch that cannot be done (a UserError while processing it, e.g. its ids cover the whole
training set, or a method that changed no weight) fails: it and its requests become `failed`
with the reason, and the next run goes on with the requests that came after. So does a batch
whose version missed its forget-accuracy target (registered, tagged `target_met=false`,
`@current` not moved), unless the job runs with --accept-unmet. A mistake in the job's command fails no request:
the data, method, search and importance store are checked before anything is claimed, and
a missing starting model leaves the claimed batch open for the next run to resume.
Requests whose ids are not in the data are `rejected` with the reason; ids removed by an
earlier version are already gone and count as done.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as sa

from unlearning.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_LEDGER = "sqlite:///requests.db"
STALE_AFTER_SECONDS = 6 * 3600  # a batch owned by another host is taken over after this
DATABASES = ("sqlite", "postgresql")  # where the claims above are exactly once (and tested)


def ledger_url(url: str | None = None) -> str:
    return url or os.environ.get("AMNESIS_LEDGER_URL", DEFAULT_LEDGER)


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str, claimed_at: datetime, stale_after: float) -> bool:
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError):
            return True
        return True
    return (_now() - claimed_at).total_seconds() < stale_after


# ---------------------------------------------------------------------- the schema (at head)


class UTCDateTime(sa.types.TypeDecorator):
    """Timezone-aware UTC datetimes in and out (SQLite keeps them as naive UTC text)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


# What the migrations in pipelines/ledger_migrations build; a test checks the two agree.
metadata = sa.MetaData()
requests_table = sa.Table(
    "requests",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("requester", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("ids", sa.JSON, nullable=False),  # the sample ids, sorted
    sa.Column("status", sa.String(16), nullable=False, index=True),  # pending|processing|done|rejected|failed
    sa.Column("batch_id", sa.Integer, nullable=True, index=True),
    sa.Column("model_version", sa.String(32), nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("note", sa.Text, nullable=True),  # why it was rejected or failed
)
batches_table = sa.Table(
    "batches",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),  # processing|done|failed
    sa.Column("owner", sa.String(200), nullable=False),
    sa.Column("claimed_at", UTCDateTime, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("model_name", sa.String(200), nullable=True),
    sa.Column("parent_version", sa.String(32), nullable=True),
    sa.Column("model_version", sa.String(32), nullable=True),
    sa.Column("run_id", sa.String(64), nullable=True),
    sa.Column("finished_at", UTCDateTime, nullable=True),
    sa.Column("note", sa.Text, nullable=True),  # why it failed
    # at most one open batch: a second claimer's insert fails (PostgreSQL: once the first commits)
    sa.Index("one_open_batch", "status", unique=True, sqlite_where=sa.text("status = 'processing'"),
             postgresql_where=sa.text("status = 'processing'")),
)
# one row: this ledger's identity (batch tags in the model registry name it, so two ledgers
# never adopt each other's versions)
identity_table = sa.Table(
    "ledger_identity", metadata, sa.Column("id", sa.Integer, primary_key=True), sa.Column("uid", sa.String(64))
)


class Ledger:
    def __init__(self, url: str | None = None):
        from pipelines.ledger_migrations import upgrade

        self.url = ledger_url(url)
        try:
            self.engine = sa.create_engine(self.url, connect_args={"timeout": 60} if self.url.startswith("sqlite") else {})
        except Exception as error:  # bad URL, missing driver
            hint = " (pip install 'amnesis[postgres]')" if getattr(error, "name", None) == "psycopg" else ""
            raise UserError(f"cannot open the request ledger {self.url}: {error}{hint}") from None
        if self.engine.dialect.name not in DATABASES:
            raise UserError(f"the request ledger runs on SQLite or PostgreSQL, not {self.engine.dialect.name} "
                            f"({self.url})")
        log.info("request ledger: %s", self.engine.url)  # the password, if any, is masked
        if self.engine.dialect.name == "sqlite":
            # pysqlite's own transaction handling defers locks; take the write lock at BEGIN so
            # that a claim (read pending, then mark them) is atomic across processes.
            @sa.event.listens_for(self.engine, "connect")
            def _connect(dbapi_connection, _record):
                dbapi_connection.isolation_level = None

            @sa.event.listens_for(self.engine, "begin")
            def _begin(connection):
                connection.exec_driver_sql("BEGIN IMMEDIATE")

        try:
            with self.engine.begin() as connection:
                upgrade(connection)  # this version's schema, all or nothing
                self.uid = connection.execute(sa.select(identity_table.c.uid)).scalar_one()
        except UserError:
            raise
        except Exception as error:
            hint = " (pip install 'amnesis[ledger]')" if getattr(error, "name", None) == "alembic" else ""
            raise UserError(f"cannot open the request ledger {self.url}: {str(error).splitlines()[0]}{hint}") from None

    # ------------------------------------------------------------------ requests

    def add(self, ids: list[int], requester: str = "", reason: str = "") -> int:
        return self.add_many([(ids, requester, reason)])[0]

    def add_many(self, requests: list[tuple[list[int], str, str]]) -> list[int]:
        rows = []
        for ids, requester, reason in requests:
            ids = sorted(set(int(i) for i in ids))
            if not ids:
                raise UserError("a deletion request needs at least one id")
            rows.append({"created_at": _now(), "requester": requester, "reason": reason, "ids": ids,
                         "status": "pending"})
        with self.engine.begin() as connection:
            return [int(connection.execute(requests_table.insert().values(**row)).inserted_primary_key[0])
                    for row in rows]

    def get(self, request_id: int) -> dict:
        with self.engine.connect() as connection:
            row = connection.execute(
                requests_table.select().where(requests_table.c.id == request_id)
            ).mappings().first()
        if row is None:
            raise UserError(f"request {request_id} is not in the ledger {self.url}")
        return dict(row)

    def list(self, status: str | None = None) -> list[dict]:
        query = requests_table.select().order_by(requests_table.c.id)
        if status:
            query = query.where(requests_table.c.status == status)
        with self.engine.connect() as connection:
            return [dict(row) for row in connection.execute(query).mappings()]

    def reject(self, request_id: int, reason: str) -> None:
        """A pending request will not be carried out, for `reason` (an operator's decision)."""
        reason = " ".join(reason.split())
        if not reason:
            raise UserError(f"rejecting request {request_id} needs a reason")
        table = requests_table
        with self.engine.begin() as connection:  # the UPDATE waits for a claim holding the row
            rejected = connection.execute(
                sa.update(table).where((table.c.id == request_id) & (table.c.status == "pending"))
                .values(status="rejected", finished_at=_now(), note=reason)
            ).rowcount
        if rejected:
            return
        row = self.get(request_id)
        where = {"processing": f" in batch {row['batch_id']}", "done": f" (version {row['model_version']})",
                 "rejected": f" already ({row['note']})", "failed": f" ({row['note']})"}.get(row["status"], "")
        raise UserError(f"request {request_id} is {row['status']}{where}; only a pending request can be rejected")

    def batch_tag(self, batch_id: int) -> str:
        return f"{self.uid}/{batch_id}"

    def batch(self, batch_id: int) -> dict:
        with self.engine.connect() as connection:
            row = connection.execute(
                batches_table.select().where(batches_table.c.id == batch_id)
            ).mappings().first()
        return dict(row) if row else {}

    # ------------------------------------------------------------------ processing

    def claim(self, stale_after: float = STALE_AFTER_SECONDS) -> Claim | None:
        """Step 1: a batch to work on (new or resumed), or None if there is nothing to do.

        Raises Busy if another live process owns the open batch, or opens one meanwhile.
        """
        try:
            with self.engine.begin() as connection:
                return self._claim(connection, stale_after)
        except sa.exc.IntegrityError:  # one_open_batch: another claimer's batch committed first
            raise Busy("another process opened a batch at the same time") from None

    def _claim(self, connection, stale_after: float) -> Claim | None:
        batches, requests = batches_table, requests_table
        open_batch = connection.execute(
            batches.select().where(batches.c.status == "processing").with_for_update()
        ).mappings().first()
        if open_batch is not None:
            if _owner_alive(open_batch["owner"], open_batch["claimed_at"], stale_after):
                raise Busy(f"batch {open_batch['id']} is being processed by {open_batch['owner']}")
            connection.execute(
                sa.update(batches).where(batches.c.id == open_batch["id"])
                .values(owner=_owner(), claimed_at=_now(), attempts=open_batch["attempts"] + 1)
            )
            batch_id, resumed = open_batch["id"], True
        else:
            pending = sa.select(requests.c.id).where(requests.c.status == "pending").with_for_update(skip_locked=True)
            if connection.execute(pending.limit(1)).first() is None:
                return None
            batch_id = int(connection.execute(
                batches.insert().values(status="processing", owner=_owner(), claimed_at=_now(), attempts=1)
            ).inserted_primary_key[0])
            connection.execute(
                sa.update(requests).where(requests.c.id.in_(pending.scalar_subquery()))
                .values(status="processing", batch_id=batch_id)
            )
            resumed = False
        rows = connection.execute(
            requests.select().where(requests.c.batch_id == batch_id).order_by(requests.c.id)
        ).mappings().all()
        return Claim(batch_id, resumed, [dict(row) for row in rows])

    def reject_claimed(self, request_ids: list[int], note: str) -> None:
        """Requests of the claimed batch that cannot be carried out leave it, rejected."""
        if not request_ids:
            return
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(requests_table).where(requests_table.c.id.in_(request_ids))
                .values(status="rejected", batch_id=None, finished_at=_now(), note=note)
            )

    def finish(self, batch_id: int, model_name: str, parent_version: str, version: str, run_id: str) -> None:
        """Step 3: the batch and its remaining requests are done with `version`."""
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(batches_table).where(batches_table.c.id == batch_id)
                .values(status="done", model_name=model_name, parent_version=parent_version,
                        model_version=version, run_id=run_id, finished_at=_now())
            )
            connection.execute(
                sa.update(requests_table)
                .where((requests_table.c.batch_id == batch_id) & (requests_table.c.status == "processing"))
                .values(status="done", model_version=version, finished_at=_now())
            )

    def fail(self, batch_id: int, reason: str) -> list[int]:
        """The batch cannot be done: it and its requests are `failed` with `reason`, and the
        next claim opens a new batch. Returns the failed requests' numbers."""
        with self.engine.begin() as connection:
            connection.execute(
                sa.update(batches_table).where(batches_table.c.id == batch_id)
                .values(status="failed", finished_at=_now(), note=reason)
            )
            in_batch = (requests_table.c.batch_id == batch_id) & (requests_table.c.status == "processing")
            failed = connection.execute(
                sa.select(requests_table.c.id).where(in_batch).order_by(requests_table.c.id)
            ).scalars().all()
            connection.execute(
                sa.update(requests_table).where(in_batch).values(status="failed", finished_at=_now(), note=reason)
            )
        return list(failed)


class Busy(UserError):
    """Another live `process` owns the open batch."""


class BatchFailed(UserError):
    """The claimed batch could not be done; it and its requests are marked `failed`."""


class TargetNotMet(BatchFailed):
    """The batch's version missed its forget-accuracy target: it is registered, `@current`
    stays, and the batch and its requests are marked `failed` (`process` exits 3)."""


@dataclass
class Claim:
    batch_id: int
    resumed: bool
    requests: list[dict]


# ---------------------------------------------------------------------- the scheduled job
