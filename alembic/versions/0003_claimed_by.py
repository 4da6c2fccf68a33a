"""Which server process is generating an answer (messages.claimed_by), so a
restarting server resets only its own interrupted answers, not those of other
servers sharing the database.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 01:21:16.063593
"""

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(sa.Column('claimed_by', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('claimed_by')

