"""The deletion-request ledger: requests arrive over time; a scheduled job processes them.

A real database through SQLAlchemy: SQLite by default (`sqlite:///requests.db` in the
working directory), any SQLAlchemy URL (e.g. PostgreSQL) via `--ledger` or
`AMNESIS_LEDGER_URL`.

Exactly once. `process` runs in three steps, each safe to interrupt:

1. claim (one transaction, holding the ledger's write lock): if a batch is `processing` and
   its owner is alive, stop (two jobs never work on the same requests, and never fork the
   model's lineage); if its owner is dead, resume that batch; otherwise open a new batch and
   move every `pending` request into it;
2. unlearn the union of the batch's ids from the registry's current version and register the
   result, tagged with the batch id. Before unlearning, the registry is asked for a version
   with that tag: if an interrupted run already registered one, it is adopted instead of
   unlearning again (nothing is applied twice);
3. finish (one transaction): the batch and its requests become `done` with the new version.

Requests whose ids are not in the data are `rejected` with the reason; ids removed by an
earlier version are already gone and count as done.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from unlearning.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_LEDGER = "sqlite:///requests.db"
STALE_AFTER_SECONDS = 6 * 3600  # a batch owned by another host is taken over after this


def ledger_url(url: str | None = None) -> str:
    return url or os.environ.get("AMNESIS_LEDGER_URL", DEFAULT_LEDGER)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_alive(owner: str, claimed_at: str, stale_after: float) -> bool:
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except (PermissionError, ValueError):
            return True
        return True
    age = (datetime.now(timezone.utc) - datetime.fromisoformat(claimed_at)).total_seconds()
    return age < stale_after


class Ledger:
    def __init__(self, url: str | None = None):
        from sqlalchemy import (
            Column,
            Integer,
            MetaData,
            String,
            Table,
            Text,
            create_engine,
            event,
        )

        self.url = ledger_url(url)
        is_sqlite = self.url.startswith("sqlite")
        try:
            self.engine = create_engine(self.url, connect_args={"timeout": 60} if is_sqlite else {})
        except Exception as error:  # bad URL, missing driver
            hint = " (pip install 'amnesis[postgres]')" if getattr(error, "name", None) == "psycopg" else ""
            raise UserError(f"cannot open the request ledger {self.url}: {error}{hint}") from None
        log.info("request ledger: %s", self.engine.url)  # the password, if any, is masked
        if is_sqlite:
            # pysqlite's own transaction handling defers locks; take the write lock at BEGIN so
            # that a claim (read pending, then mark them) is atomic across processes.
            @event.listens_for(self.engine, "connect")
            def _connect(dbapi_connection, _record):
                dbapi_connection.isolation_level = None

            @event.listens_for(self.engine, "begin")
            def _begin(connection):
                connection.exec_driver_sql("BEGIN IMMEDIATE")

        metadata = MetaData()
        self.requests = Table(
            "requests",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("created_at", String(32), nullable=False),
            Column("requester", String(200), nullable=False, default=""),
            Column("reason", Text, nullable=False, default=""),
            Column("ids", Text, nullable=False),  # JSON list of sample ids
            Column("status", String(16), nullable=False, index=True),  # pending|processing|done|rejected
            Column("batch_id", Integer, nullable=True, index=True),
            Column("model_version", String(32), nullable=True),
            Column("finished_at", String(32), nullable=True),
            Column("note", Text, nullable=True),
        )
        self.batches = Table(
            "batches",
            metadata,
            Column("id", Integer, primary_key=True, autoincrement=True),
            Column("status", String(16), nullable=False, index=True),  # processing|done
            Column("owner", String(200), nullable=False),
            Column("claimed_at", String(32), nullable=False),
            Column("attempts", Integer, nullable=False, default=1),
            Column("model_name", String(200), nullable=True),
            Column("parent_version", String(32), nullable=True),
            Column("model_version", String(32), nullable=True),
            Column("run_id", String(64), nullable=True),
            Column("finished_at", String(32), nullable=True),
        )
        # one row: the lock that serialises claims, and this ledger's identity (batch tags in
        # the model registry name it, so two ledgers never adopt each other's versions)
        self.lock = Table(
            "ledger_lock", metadata, Column("id", Integer, primary_key=True), Column("uid", String(64))
        )
        try:
            metadata.create_all(self.engine)
            with self.engine.begin() as connection:
                if connection.execute(self.lock.select()).first() is None:
                    connection.execute(self.lock.insert().values(id=1, uid=uuid.uuid4().hex))
                self.uid = connection.execute(self.lock.select()).mappings().first()["uid"]
        except Exception as error:
            raise UserError(f"cannot open the request ledger {self.url}: {str(error).splitlines()[0]}") from None

    def _locked(self, connection) -> None:
        """Serialise claims on databases with row locks (SQLite is already locked at BEGIN)."""
        connection.execute(self.lock.select().with_for_update())

    # ------------------------------------------------------------------ requests

    def add(self, ids: list[int], requester: str = "", reason: str = "") -> int:
        ids = sorted(set(int(i) for i in ids))
        if not ids:
            raise UserError("a deletion request needs at least one id")
        with self.engine.begin() as connection:
            result = connection.execute(
                self.requests.insert().values(
                    created_at=_now(), requester=requester, reason=reason, ids=json.dumps(ids), status="pending"
                )
            )
            return int(result.inserted_primary_key[0])

    def add_many(self, requests: list[tuple[list[int], str, str]]) -> list[int]:
        with self.engine.begin() as connection:
            numbers = []
            for ids, requester, reason in requests:
                result = connection.execute(
                    self.requests.insert().values(
                        created_at=_now(), requester=requester, reason=reason,
                        ids=json.dumps(sorted(set(ids))), status="pending",
                    )
                )
                numbers.append(int(result.inserted_primary_key[0]))
            return numbers

    def get(self, request_id: int) -> dict:
        with self.engine.connect() as connection:
            row = connection.execute(self.requests.select().where(self.requests.c.id == request_id)).mappings().first()
        if row is None:
            raise UserError(f"request {request_id} is not in the ledger {self.url}")
        return {**row, "ids": json.loads(row["ids"])}

    def list(self, status: str | None = None) -> list[dict]:
        query = self.requests.select().order_by(self.requests.c.id)
        if status:
            query = query.where(self.requests.c.status == status)
        with self.engine.connect() as connection:
            return [{**row, "ids": json.loads(row["ids"])} for row in connection.execute(query).mappings()]

    def batch_tag(self, batch_id: int) -> str:
        return f"{self.uid}/{batch_id}"

    def batch(self, batch_id: int) -> dict:
        with self.engine.connect() as connection:
            row = connection.execute(self.batches.select().where(self.batches.c.id == batch_id)).mappings().first()
        return dict(row) if row else {}

    # ------------------------------------------------------------------ processing

    def claim(self, stale_after: float = STALE_AFTER_SECONDS) -> Claim | None:
        """Step 1: a batch to work on (new or resumed), or None if there is nothing to do.

        Raises Busy if another live process owns the open batch.
        """
        from sqlalchemy import update

        with self.engine.begin() as connection:
            self._locked(connection)
            open_batch = connection.execute(
                self.batches.select().where(self.batches.c.status == "processing")
            ).mappings().first()
            if open_batch is not None:
                if _owner_alive(open_batch["owner"], open_batch["claimed_at"], stale_after):
                    raise Busy(f"batch {open_batch['id']} is being processed by {open_batch['owner']}")
                connection.execute(
                    update(self.batches)
                    .where(self.batches.c.id == open_batch["id"])
                    .values(owner=_owner(), claimed_at=_now(), attempts=open_batch["attempts"] + 1)
                )
                batch_id, resumed = open_batch["id"], True
            else:
                pending = connection.execute(
                    self.requests.select().where(self.requests.c.status == "pending")
                ).first()
                if pending is None:
                    return None
                result = connection.execute(
                    self.batches.insert().values(status="processing", owner=_owner(), claimed_at=_now(), attempts=1)
                )
                batch_id, resumed = int(result.inserted_primary_key[0]), False
                connection.execute(
                    update(self.requests)
                    .where(self.requests.c.status == "pending")
                    .values(status="processing", batch_id=batch_id)
                )
            rows = connection.execute(
                self.requests.select().where(self.requests.c.batch_id == batch_id).order_by(self.requests.c.id)
            ).mappings().all()
        return Claim(batch_id, resumed, [{**r, "ids": json.loads(r["ids"])} for r in rows])

    def reject(self, request_ids: list[int], note: str) -> None:
        from sqlalchemy import update

        if not request_ids:
            return
        with self.engine.begin() as connection:
            connection.execute(
                update(self.requests)
                .where(self.requests.c.id.in_(request_ids))
                .values(status="rejected", batch_id=None, finished_at=_now(), note=note)
            )

    def finish(self, batch_id: int, model_name: str, parent_version: str, version: str, run_id: str) -> None:
        """Step 3: the batch and its remaining requests are done with `version`."""
        from sqlalchemy import update

        with self.engine.begin() as connection:
            connection.execute(
                update(self.batches)
                .where(self.batches.c.id == batch_id)
                .values(status="done", model_name=model_name, parent_version=parent_version,
                        model_version=version, run_id=run_id, finished_at=_now())
            )
            connection.execute(
                update(self.requests)
                .where((self.requests.c.batch_id == batch_id) & (self.requests.c.status == "processing"))
                .values(status="done", model_version=version, finished_at=_now())
            )


class Busy(UserError):
    """Another live `process` owns the open batch."""


@dataclass
class Claim:
    batch_id: int
    resumed: bool
    requests: list[dict]


# ---------------------------------------------------------------------- the scheduled job


def process_pending(
    ledger: Ledger,
    model_name: str,
    data_spec: str,
    out_root: str | Path,
    initial_model: str | None = None,
    options=None,
    fault_point=None,
) -> dict:
    """Process every pending request in one batch; returns a summary.

    `fault_point(step)` is called after each step ("claimed", "unlearning", "logged",
    "registered", "finished"); tests pass one that stops the process there to kill it.
    """
    from pipelines.tracking import find_batch_version, register_alias

    pause_point = fault_point or (lambda step: None)
    claim = ledger.claim()  # step 1
    if claim is None:
        return {"batch": None, "processed": 0, "message": "no pending requests"}
    log.info("batch %d claimed%s: requests %s", claim.batch_id, " again (resumed)" if claim.resumed else "",
             ", ".join(str(r["id"]) for r in claim.requests))
    pause_point("claimed")

    adopted = find_batch_version(model_name, ledger.batch_tag(claim.batch_id))
    if adopted is None:  # step 2
        job = _BatchJob(ledger, claim, model_name, data_spec, Path(out_root), initial_model)
        skipped = job.select_ids()
        if skipped is not None:
            return skipped
        version, parent, run_id = job.unlearn(options, fault_point)
    else:  # an interrupted run registered it already: adopt it, apply nothing twice
        log.info("batch %d: version %s was registered by an interrupted run; adopted", claim.batch_id,
                 adopted["version"])
        register_alias(model_name, adopted["version"])
        version, parent, run_id = adopted["version"], adopted["tags"].get("parent_version", ""), adopted["run_id"]
    ledger.finish(claim.batch_id, model_name, parent, version, run_id)  # step 3
    pause_point("finished")
    done = sum(1 for r in ledger.list("done") if r["batch_id"] == claim.batch_id)
    return {"batch": claim.batch_id, "processed": done, "resumed": claim.resumed,
            "model_version": version, "adopted": adopted is not None}


class _BatchJob:
    """Step 2 of `process_pending` for one claimed batch: which ids to remove, then unlearn."""

    def __init__(self, ledger: Ledger, claim: Claim, model_name: str, data_spec: str, out_root: Path,
                 initial_model: str | None):
        from pipelines.tracking import lineage_removed_ids, version_info

        self.ledger, self.claim, self.model_name, self.data_spec = ledger, claim, model_name, data_spec
        self.out_root, self.wanted = out_root, set()
        self.base = version_info(model_name)
        if self.base is None:
            if not initial_model:
                raise UserError(f"model {model_name!r} is not registered yet; give --initial-model CKPT once")
            self.model_uri, self.removed = initial_model, []
        else:
            self.model_uri = f"models:/{model_name}/{self.base['version']}"
            self.removed = lineage_removed_ids(model_name, self.base["version"])

    def select_ids(self) -> dict | None:
        """Reject requests with ids not in the data; None if ids remain to remove, else a summary."""
        import unlearning

        known = set(unlearning.data.open_dataset(self.data_spec).train.ids.tolist())  # ids only
        already, rejected = set(self.removed), []
        for request in self.claim.requests:
            unknown = [i for i in request["ids"] if i not in known]
            if unknown:
                rejected.append((request["id"], unknown))
            else:
                self.wanted.update(i for i in request["ids"] if i not in already)
        for request_id, unknown in rejected:
            self.ledger.reject([request_id], f"ids not in the data: {unknown[:5]}")
        if self.wanted:
            return None
        version = self.base["version"] if self.base else None  # everything asked for is gone already
        self.ledger.finish(self.claim.batch_id, self.model_name, version, version, "")
        return {"batch": self.claim.batch_id, "processed": len(self.claim.requests) - len(rejected),
                "rejected": len(rejected), "model_version": version, "message": "nothing left to remove"}

    def unlearn(self, options, fault_point) -> tuple[str, str, str]:
        """Forget the wanted ids from the base version, registered with the batch's tag."""
        from pipelines.request import ForgetOptions, run_forget

        pause_point = fault_point or (lambda step: None)
        batch_id = self.claim.batch_id
        self.out_root.mkdir(parents=True, exist_ok=True)
        ids_file = self.out_root / f"batch-{batch_id}-ids.txt"
        ids_file.write_text("".join(f"{i}\n" for i in sorted(self.wanted)))
        options = options or ForgetOptions()
        options.model_name, options.track = self.model_name, True
        options.batch_tag = self.ledger.batch_tag(batch_id)
        out = self.out_root / f"batch-{batch_id}"
        if out.exists():  # a previous attempt wrote it but did not register: keep it, write anew
            out = self.out_root / f"batch-{batch_id}-attempt-{datetime.now().strftime('%H%M%S')}"
        pause_point("unlearning")
        report = run_forget(self.model_uri, self.data_spec, str(ids_file), str(out), options, fault_point=fault_point)
        pause_point("registered")
        entry = report.mlflow
        return entry.model_version, entry.parent_version, entry.run_id
