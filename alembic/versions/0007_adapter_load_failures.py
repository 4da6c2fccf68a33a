"""Per-replica adapter load failures: a server that cannot load the active
version records it here and keeps serving its previous adapter; the version
is marked failed only when every live server has failed to load it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:00:00.000000
"""

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('adapter_load_failures',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('adapter_version_id', sa.Integer(), nullable=False),
    sa.Column('replica', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('failed_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['adapter_version_id'], ['adapter_versions.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('adapter_version_id', 'replica', name='uq_adapter_load_failures_version_replica')
    )
    with op.batch_alter_table('adapter_load_failures', schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f('ix_adapter_load_failures_adapter_version_id'), ['adapter_version_id'], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table('adapter_load_failures', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_adapter_load_failures_adapter_version_id'))

    op.drop_table('adapter_load_failures')
