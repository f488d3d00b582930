"""Inspection records (one row per /inspect answer) and operator reviews.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", sa.String(length=36), nullable=False, comment="UUIDv7 (time ordered)"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False, comment="HTTP status of the answer"),
        sa.Column("error_code", sa.String(length=64), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("output", sa.String(length=8), nullable=False),
        sa.Column("product", sa.String(length=64), nullable=True),
        sa.Column("recipe_digest", sa.String(length=16), nullable=True, comment="digest of the recipe JSON"),
        sa.Column("prompt_digest", sa.String(length=64), nullable=True),
        sa.Column("method", sa.String(length=32), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("weights", sa.String(length=256), nullable=True),
        sa.Column("precision", sa.String(length=8), nullable=True),
        sa.Column("demo", sa.Boolean(), nullable=False),
        sa.Column("reference_key", sa.String(length=64), nullable=True),
        sa.Column("reference_count", sa.Integer(), nullable=False),
        sa.Column("used_references", sa.Boolean(), nullable=False),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("threshold_source", sa.String(length=32), nullable=True, comment="product | generic | ..."),
        sa.Column("threshold_provenance", sa.JSON(), nullable=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("normalized_score", sa.Float(), nullable=True),
        sa.Column("decision", sa.String(length=16), nullable=True),
        sa.Column("regions", sa.JSON(), nullable=True),
        sa.Column("regions_truncated", sa.Boolean(), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("batch_size", sa.Integer(), nullable=False),
        sa.Column("timings_ms", sa.JSON(), nullable=True),
        sa.Column(
            "image_sha256", sa.String(length=64), nullable=True, comment="sha256 of the uploaded bytes"
        ),
        sa.Column("image_bytes", sa.Integer(), nullable=True),
        sa.Column("image_width", sa.Integer(), nullable=True),
        sa.Column("image_height", sa.Integer(), nullable=True),
        sa.Column("image_path", sa.String(length=255), nullable=True, comment="relative to the image root"),
        sa.Column("map_path", sa.String(length=255), nullable=True),
        sa.Column("line", sa.String(length=64), nullable=True),
        sa.Column("station", sa.String(length=64), nullable=True),
        sa.Column("part_id", sa.String(length=64), nullable=True),
        sa.Column("review_verdict", sa.String(length=16), nullable=True),
        sa.Column("review_note", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.String(length=128), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("inspections", schema=None) as batch_op:
        batch_op.create_index("ix_inspections_created", ["created_at", "id"], unique=False)
        batch_op.create_index("ix_inspections_line_station", ["line", "station"], unique=False)
        batch_op.create_index("ix_inspections_product_created", ["product", "created_at"], unique=False)
        batch_op.create_index("ix_inspections_review", ["review_verdict"], unique=False)

    op.create_table(
        "inspection_reviews",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("inspection_id", sa.String(length=36), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["inspection_id"], ["inspections.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("inspection_reviews", schema=None) as batch_op:
        batch_op.create_index("ix_inspection_reviews_inspection", ["inspection_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("inspection_reviews", schema=None) as batch_op:
        batch_op.drop_index("ix_inspection_reviews_inspection")

    op.drop_table("inspection_reviews")
    with op.batch_alter_table("inspections", schema=None) as batch_op:
        batch_op.drop_index("ix_inspections_review")
        batch_op.drop_index("ix_inspections_product_created")
        batch_op.drop_index("ix_inspections_line_station")
        batch_op.drop_index("ix_inspections_created")

    op.drop_table("inspections")
