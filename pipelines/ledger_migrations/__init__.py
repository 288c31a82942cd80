"""The ledger's schema migrations (Alembic), run by `Ledger()` each time it opens a database.

`upgrade(connection)` brings any ledger to this version's head inside the caller's
transaction, so an upgrade is all or nothing (SQLite and PostgreSQL both have transactional
DDL). Revision 0001 is the schema the ledger had before migrations existed: a database with
its tables but no `alembic_version` table is stamped 0001 first, then upgraded like any other.

A new migration is a file in `versions/` whose `down_revision` is the current head; they are
written by hand (the ledger has three tables) and run forward only. There is no alembic.ini:
nothing about them is configured outside this package.
"""

from __future__ import annotations

from pathlib import Path

from unlearning.errors import UserError

BASELINE = "0001"  # the schema of the ledgers made before migrations
MIGRATION_LOCK = 7_305_155_214  # pg_advisory_xact_lock key: one migrator at a time on PostgreSQL


def upgrade(connection) -> None:
    """Migrate the ledger behind `connection` (in a transaction) to the head revision."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent).replace("%", "%%"))
    config.attributes["connection"] = connection  # env.py runs the migrations on it
    if connection.dialect.name == "postgresql":  # SQLite: the caller holds the write lock already
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    script = ScriptDirectory.from_config(config)
    current = MigrationContext.configure(connection).get_current_heads()
    for revision in current:
        try:
            script.get_revision(revision)
        except CommandError:
            raise UserError(f"the ledger's schema (revision {revision}) was made by a newer Amnesis; "
                            f"this one knows up to {script.get_current_head()}") from None
    if not current and sa.inspect(connection).has_table("requests"):
        command.stamp(config, BASELINE)  # made before migrations existed
    if tuple(current) != (script.get_current_head(),):
        command.upgrade(config, "head")
