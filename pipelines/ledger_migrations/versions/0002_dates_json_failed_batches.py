"""Dates as DateTime, ids as JSON; batches can fail with a note; one open batch at a time.

- `created_at`, `claimed_at`, `finished_at`: ISO text -> timezone-aware DateTime (UTC);
  `requests.ids`: JSON text -> JSON.
- `batches.note`: why a batch failed (its requests carry the same note).
- `ledger_lock` -> `ledger_identity`: claims no longer lock it (PostgreSQL locks the request
  rows it takes, SQLite its database); it keeps the ledger's uid.
- `one_open_batch`: a unique index on `batches.status` over the `processing` rows, so the
  database itself refuses a second open batch (two claimers never fork the lineage).

Revision ID: 0002
Revises: 0001
"""

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DATES = {"requests": ["created_at", "finished_at"], "batches": ["claimed_at", "finished_at"]}
INDEXES = {"requests": ["status", "batch_id"], "batches": ["status"]}  # ix_<table>_<column>, as in 0001
OPEN = sa.text("status = 'processing'")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, columns in DATES.items():
            for column in columns:
                op.alter_column(table, column, type_=sa.DateTime(timezone=True), existing_type=sa.String(32),
                                postgresql_using=f"{column}::timestamptz")
        op.alter_column("requests", "ids", type_=sa.JSON, existing_type=sa.Text, postgresql_using="ids::json")
    else:
        _sqlite_retype()
    op.add_column("batches", sa.Column("note", sa.Text, nullable=True))
    op.rename_table("ledger_lock", "ledger_identity")
    op.create_index("one_open_batch", "batches", ["status"], unique=True,
                    sqlite_where=OPEN, postgresql_where=OPEN)


def _sqlite_retype() -> None:
    """Recreate the tables with the new declared types, copying the stored text as it is,
    then rewrite the dates in the form SQLAlchemy reads (SQLite stores both as text; a CAST
    to DATETIME would turn '2025-03-01T10:00:00+00:00' into the number 2025)."""
    retyped = sa.MetaData()
    tables = {
        "requests": sa.Table(
            "requests", retyped,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("requester", sa.String(200), nullable=False),
            sa.Column("reason", sa.Text, nullable=False),
            sa.Column("ids", sa.JSON, nullable=False),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("batch_id", sa.Integer, nullable=True),
            sa.Column("model_version", sa.String(32), nullable=True),
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("note", sa.Text, nullable=True),
        ),
        "batches": sa.Table(
            "batches", retyped,
            sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("owner", sa.String(200), nullable=False),
            sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("model_name", sa.String(200), nullable=True),
            sa.Column("parent_version", sa.String(32), nullable=True),
            sa.Column("model_version", sa.String(32), nullable=True),
            sa.Column("run_id", sa.String(64), nullable=True),
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        ),
    }
    bind = op.get_bind()
    for name, table in tables.items():
        with op.batch_alter_table(name, recreate="always", copy_from=table) as batch:
            for column in INDEXES[name]:  # the new table is `table`; the rows are copied without a CAST
                batch.create_index(f"ix_{name}_{column}", [column])
        columns = DATES[name]
        text = sa.table(name, sa.column("id", sa.Integer), *(sa.column(c, sa.String) for c in columns))
        dated = sa.table(name, sa.column("id", sa.Integer), *(sa.column(c, sa.DateTime) for c in columns))
        for row in bind.execute(sa.select(text)).mappings().all():
            values = {c: _utc(row[c]) for c in columns}
            bind.execute(sa.update(dated).where(dated.c.id == row["id"]).values(**values))


def _utc(text: str | None) -> datetime | None:
    """'2025-03-01T10:00:00+00:00' (what the ledger wrote) -> a naive UTC datetime."""
    if text is None:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return moment


def downgrade() -> None:
    raise NotImplementedError("the ledger's migrations run forward only")
