"""Which lesion embedding made each case's vectors.

A version set with a fine-tuned ``lesion_embed`` makes vectors that cannot be compared with another's, so each
case records the embedding that made it: ``""`` for version 1's (the shipped one: every case stored before this
column existed was made by it), else the first 16 hex digits of the model's SHA-256.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("cases", sa.Column("embedding", sa.String(64), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("cases") as batch:
        batch.drop_column("embedding")
