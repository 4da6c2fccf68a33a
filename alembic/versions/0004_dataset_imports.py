"""Dataset imports: a record per imported file (import_batches) and which
import added each imported preference pair (import_batch_pairs).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 10:00:00.000000
"""

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('import_batches',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(length=500), nullable=False),
    sa.Column('format', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('file_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('rows', sa.Integer(), nullable=False),
    sa.Column('added', sa.Integer(), nullable=False),
    sa.Column('duplicates', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('import_batches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_import_batches_file_sha256'), ['file_sha256'], unique=False)

    op.create_table('import_batch_pairs',
    sa.Column('pair_id', sa.Integer(), nullable=False),
    sa.Column('batch_id', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['import_batches.id'], ),
    sa.ForeignKeyConstraint(['pair_id'], ['preference_pairs.id'], ),
    sa.PrimaryKeyConstraint('pair_id')
    )
    with op.batch_alter_table('import_batch_pairs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_import_batch_pairs_batch_id'), ['batch_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('import_batch_pairs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_import_batch_pairs_batch_id'))

    op.drop_table('import_batch_pairs')
    with op.batch_alter_table('import_batches', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_import_batches_file_sha256'))

    op.drop_table('import_batches')
