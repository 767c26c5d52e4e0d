"""Storage: engine, unit of work, shared table metadata and Alembic migrations."""
