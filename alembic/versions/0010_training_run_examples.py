"""Single thumbs a training run used (store.examples): which feedback row, with
which label, as new (trained), eval (held out for the gate) or skipped.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 15:00:00.000000
"""

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('training_run_examples',
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('feedback_id', sa.Integer(), nullable=False),
    sa.Column('label', sa.Boolean(), nullable=False),
    sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=8), nullable=False),
    sa.ForeignKeyConstraint(['feedback_id'], ['feedback.id'], ),
    sa.ForeignKeyConstraint(['run_id'], ['training_runs.id'], ),
    sa.PrimaryKeyConstraint('run_id', 'feedback_id')
    )
    with op.batch_alter_table('training_run_examples', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_run_examples_feedback_id'), ['feedback_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('training_run_examples', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_run_examples_feedback_id'))

    op.drop_table('training_run_examples')
