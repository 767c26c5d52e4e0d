"""All configuration, read once from the environment (prefix ``JIFEN_``) or a ``.env`` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "jifen"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="JIFEN_", env_file=".env", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    """Where the embedded SQLite database and other local files live."""

    database_url: str = ""
    """SQLAlchemy URL; empty means ``sqlite:///<data_dir>/jifen.db``. A plain
    ``postgresql://`` URL is driven by psycopg 3."""

    language: str = "en"
    """Language of CLI messages: ``en`` or ``zh``."""

    def resolved_database_url(self) -> str:
        return normalise_database_url(self.database_url) or (
            f"sqlite:///{self.data_dir / 'jifen.db'}"
        )


def normalise_database_url(url: str) -> str:
    """Make a plain ``postgresql://`` or ``postgres://`` URL use the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
