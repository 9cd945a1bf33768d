"""Alembic migrations of the bulksend schema (shipped inside the wheel as bulksend.migrations)."""
