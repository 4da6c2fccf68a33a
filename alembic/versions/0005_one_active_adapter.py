"""Exactly one active adapter version, guaranteed by the database: a partial
unique index on adapter_versions(status) where status = 'active'.

A database that a read-then-write race left with several active rows keeps
the most recently activated one; the others become retired.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 04:00:00.000000
"""

import sqlalchemy as sa

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

ACTIVE = sa.text("status = 'active'")


def upgrade() -> None:
    op.execute(
        "UPDATE adapter_versions SET status = 'retired' WHERE status = 'active' AND id <> ("
        "SELECT id FROM adapter_versions WHERE status = 'active' "
        "ORDER BY activated_at DESC, id DESC LIMIT 1)"
    )
    op.create_index(
        'uq_adapter_versions_one_active', 'adapter_versions', ['status'], unique=True,
        sqlite_where=ACTIVE, postgresql_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index('uq_adapter_versions_one_active', table_name='adapter_versions')
