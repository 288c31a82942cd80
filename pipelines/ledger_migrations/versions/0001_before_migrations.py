"""The ledger as it was before migrations: dates as ISO text, ids as JSON text, a lock table.

Exactly what `metadata.create_all` made then (same names, types and indexes), so that a
ledger from that time is this revision and is stamped, not created.

Revision ID: 0001
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "requests",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", sa.String(32), nullable=False),
        sa.Column("requester", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("ids", sa.Text, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("batch_id", sa.Integer, nullable=True),
        sa.Column("model_version", sa.String(32), nullable=True),
        sa.Column("finished_at", sa.String(32), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
    )
    op.create_index("ix_requests_status", "requests", ["status"])
    op.create_index("ix_requests_batch_id", "requests", ["batch_id"])
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(200), nullable=False),
        sa.Column("claimed_at", sa.String(32), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("model_name", sa.String(200), nullable=True),
        sa.Column("parent_version", sa.String(32), nullable=True),
        sa.Column("model_version", sa.String(32), nullable=True),
        sa.Column("run_id", sa.String(64), nullable=True),
        sa.Column("finished_at", sa.String(32), nullable=True),
    )
    op.create_index("ix_batches_status", "batches", ["status"])
    lock = op.create_table(
        "ledger_lock", sa.Column("id", sa.Integer, primary_key=True), sa.Column("uid", sa.String(64))
    )
    op.bulk_insert(lock, [{"id": 1, "uid": uuid.uuid4().hex}])  # the ledger's identity


def downgrade() -> None:
    raise NotImplementedError("the ledger's migrations run forward only")
