"""Accounts (username, argon2 password hash, role, status, session epoch),
exclusion of a conversation or a pair from training, and assistant turns
written by API callers marked as such.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 05:00:00.000000
"""

import sqlalchemy as sa
import sqlmodel

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('users') as batch:
        batch.add_column(sa.Column('username', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch.add_column(sa.Column('password_hash', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=True))
        batch.add_column(sa.Column('role', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False,
                                   server_default='user'))
        batch.add_column(sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False,
                                   server_default='active'))
        batch.add_column(sa.Column('session_epoch', sa.Integer(), nullable=False, server_default='0'))
        batch.create_unique_constraint('uq_users_username', ['username'])
    with op.batch_alter_table('conversations') as batch:
        batch.add_column(sa.Column('excluded_from_training', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table('messages') as batch:
        batch.add_column(sa.Column('caller_written', sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table('preference_pairs') as batch:
        batch.add_column(sa.Column('excluded_from_training', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    # API callers' assistant turns stored before this revision: every assistant
    # message of an API conversation that is not one of tuneloop's answers.
    op.execute(
        "UPDATE messages SET caller_written = TRUE WHERE role = 'assistant' AND sampling IS NULL "
        "AND conversation_id IN (SELECT id FROM conversations WHERE source = 'api')"
    )


def downgrade() -> None:
    with op.batch_alter_table('preference_pairs') as batch:
        batch.drop_column('excluded_from_training')
    with op.batch_alter_table('messages') as batch:
        batch.drop_column('caller_written')
    with op.batch_alter_table('conversations') as batch:
        batch.drop_column('excluded_from_training')
    with op.batch_alter_table('users') as batch:
        batch.drop_constraint('uq_users_username', type_='unique')
        for column in ('session_epoch', 'status', 'role', 'password_hash', 'username'):
            batch.drop_column(column)
