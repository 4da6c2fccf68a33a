"""Retraining loop: preference pairs, which runs used which pairs (lineage),
leases (one cycle at a time), admin exclusion of messages, run -> adapter links.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 00:23:38.753976
"""

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('leases',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('holder', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('preference_pairs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.JSON(), nullable=False),
    sa.Column('chosen', sa.Text(), nullable=False),
    sa.Column('rejected', sa.Text(), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('split', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.Column('content_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('chosen_message_id', sa.Integer(), nullable=True),
    sa.Column('rejected_message_id', sa.Integer(), nullable=True),
    sa.Column('comparison_id', sa.Integer(), nullable=True),
    sa.Column('chosen_feedback_id', sa.Integer(), nullable=True),
    sa.Column('rejected_feedback_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['chosen_feedback_id'], ['feedback.id'], ),
    sa.ForeignKeyConstraint(['chosen_message_id'], ['messages.id'], ),
    sa.ForeignKeyConstraint(['comparison_id'], ['comparisons.id'], ),
    sa.ForeignKeyConstraint(['rejected_feedback_id'], ['feedback.id'], ),
    sa.ForeignKeyConstraint(['rejected_message_id'], ['messages.id'], ),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('content_hash')
    )
    with op.batch_alter_table('preference_pairs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_preference_pairs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_preference_pairs_split'), ['split'], unique=False)
        batch_op.create_index(batch_op.f('ix_preference_pairs_user_id'), ['user_id'], unique=False)

    op.create_table('training_run_pairs',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('pair_id', sa.Integer(), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.ForeignKeyConstraint(['pair_id'], ['preference_pairs.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['training_runs.id'], ),
    sa.PrimaryKeyConstraint('run_id', 'pair_id')
    )
    with op.batch_alter_table('training_run_pairs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_run_pairs_pair_id'), ['pair_id'], unique=False)

    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('excluded_from_training', sa.Boolean(), nullable=False, server_default=sa.false())
        )

    with op.batch_alter_table('training_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('adapter_version', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('parent_version', sa.Integer(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('training_runs', schema=None) as batch_op:
        batch_op.drop_column('parent_version')
        batch_op.drop_column('adapter_version')

    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('excluded_from_training')

    with op.batch_alter_table('training_run_pairs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_run_pairs_pair_id'))

    op.drop_table('training_run_pairs')
    with op.batch_alter_table('preference_pairs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_preference_pairs_user_id'))
        batch_op.drop_index(batch_op.f('ix_preference_pairs_split'))
        batch_op.drop_index(batch_op.f('ix_preference_pairs_created_at'))

    op.drop_table('preference_pairs')
    op.drop_table('leases')
