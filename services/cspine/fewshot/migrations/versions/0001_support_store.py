"""Support store, first schema.

Cases (study UID hash, label, pathology reference, curator — no pixels, no identity), their per-modality
embeddings, immutable prototype-set versions and their membership, and the one head row writers lock.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    head = op.create_table(
        "store_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "version": 0}])
    op.create_table(
        "versions",
        sa.Column("number", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
        sa.Column("change", sa.Text, nullable=False),
    )
    op.create_table(
        "cases",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("study_uid_hash", sa.String(64), nullable=False),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("pathology_reference", sa.Text, nullable=False),
        sa.Column("note", sa.Text, nullable=False),
        sa.Column("curator", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("synthetic", sa.Boolean, nullable=False),
    )
    op.create_index("ix_cases_study_uid_hash", "cases", ["study_uid_hash"])
    op.create_table(
        "case_embeddings",
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), primary_key=True),
        sa.Column("modality", sa.String(8), primary_key=True),
        sa.Column("vector", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "version_cases",
        sa.Column("version", sa.Integer, sa.ForeignKey("versions.number"), primary_key=True),
        sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), primary_key=True),
    )
    op.create_index("ix_version_cases_case_id", "version_cases", ["case_id"])


def downgrade() -> None:
    for table in ("version_cases", "case_embeddings", "cases", "versions", "store_head"):
        op.drop_table(table)
