"""Stream products: who answered (warming_up | stream) and the bank size after the answer.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("inspections", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "stream_mode", sa.String(length=16), nullable=True, comment="warming_up | stream (else null)"
            )
        )
        batch_op.add_column(sa.Column("bank_size", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("inspections", schema=None) as batch_op:
        batch_op.drop_column("bank_size")
        batch_op.drop_column("stream_mode")
