"""jobs.input_instances: the instances a job reads, when not every instance of its series

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 07:50:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("input_instances", sa.JSON(), nullable=True))


def downgrade() -> None:
    # a plain ALTER TABLE (SQLite >= 3.35): a batch rebuild of jobs would fire the ON DELETE
    # CASCADE of steps, artifacts and deliveries
    op.drop_column("jobs", "input_instances")
