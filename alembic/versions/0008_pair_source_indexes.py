"""Indexes on the feedback a pair was built from: a changed thumb or A/B choice
withdraws its pairs by ``chosen_feedback_id``/``rejected_feedback_id`` or
``comparison_id`` (store.pairs), which without them scans every pair -- a cost
growing with the history on every feedback write.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 12:00:00.000000
"""

from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

COLUMNS = ('comparison_id', 'chosen_feedback_id', 'rejected_feedback_id')


def upgrade() -> None:
    with op.batch_alter_table('preference_pairs', schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.create_index(batch_op.f(f'ix_preference_pairs_{column}'), [column], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('preference_pairs', schema=None) as batch_op:
        for column in COLUMNS:
            batch_op.drop_index(batch_op.f(f'ix_preference_pairs_{column}'))
