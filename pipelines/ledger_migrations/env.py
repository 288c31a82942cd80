"""Alembic's entry point: run the migrations on the connection `upgrade()` passed in."""

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():  # the caller's transaction: nothing is committed here
    context.run_migrations()
