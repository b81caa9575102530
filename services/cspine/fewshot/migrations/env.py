"""Alembic environment of the support store: migrates the connection SupportStore.migrate() hands over (or,
from the alembic command line, a connection to ``sqlalchemy.url``)."""

from alembic import context
from sqlalchemy import create_engine

connection = context.config.attributes.get("connection")
if connection is not None:
    context.configure(connection=connection)
    with context.begin_transaction():  # SupportStore.migrate() already holds the transaction
        context.run_migrations()
else:
    url = context.config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("the alembic configuration names no sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
