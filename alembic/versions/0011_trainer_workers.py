"""Trainer workers: a run queued for a `tuneloop trainer` worker names the
worker that claimed it and the time by which one must claim it.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 10:30:00.000000
"""

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('training_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('worker', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True))
        batch_op.add_column(sa.Column('claim_by', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('training_runs', schema=None) as batch_op:
        batch_op.drop_column('claim_by')
        batch_op.drop_column('worker')
