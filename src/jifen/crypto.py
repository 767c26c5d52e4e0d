"""Keyed hashes and field encryption, both from the installation's secret key.

Personal data that staff must be able to look up but that must not leak (phone numbers, ID
numbers) is stored twice: a keyed hash to find it, and an AES-GCM ciphertext (Fernet) to
show it to permitted staff. Secrets that are only ever compared (API key secrets, session
tokens, one-time codes) are stored as keyed hashes alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from jifen.settings import get_settings, secret_key


def _derive(purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
        secret_key(get_settings())
    )


@lru_cache(maxsize=1)
def _hash_key() -> bytes:
    return _derive(b"jifen keyed hash v1")


@lru_cache(maxsize=1)
def _fingerprint_key() -> bytes:
    return _derive(b"jifen request fingerprint v1")


@lru_cache(maxsize=1)
def _event_mac() -> hmac.HMAC:
    """The event fingerprint's HMAC with its key set up, which each event copies rather
    than set the key up again (ingestion is timed per event)."""
    return hmac.new(_derive(b"jifen event fingerprint v1"), digestmod=hashlib.sha256)


@lru_cache(maxsize=1)
def draw_key() -> bytes:
    """The key that seeds the rules' random draws (HMAC-SHA256): a sender that chooses its
    event ids cannot know which ids win, while whoever holds the installation's secret can
    replay a recorded draw."""
    return _derive(b"jifen rule draws v1")


@lru_cache(maxsize=1)
def _fernet() -> Fernet:
    return Fernet(base64.urlsafe_b64encode(_derive(b"jifen field encryption v1")))


def keyed_hash(value: str) -> str:
    """HMAC-SHA256 of ``value`` under the installation's key, as 64 hex digits."""
    return hmac.new(_hash_key(), value.encode(), hashlib.sha256).hexdigest()


def request_fingerprint(text: str) -> str:
    """HMAC-SHA256 of a request (method, path, body) under a key of its own, as 64 hex
    digits: a stored fingerprint recognises a replay, while a copy of the database alone
    cannot test guesses of the phone, ID number or password the body held."""
    return hmac.new(_fingerprint_key(), text.encode(), hashlib.sha256).hexdigest()


def event_fingerprint(text: str) -> str:
    """HMAC-SHA256 of an event's canonical text under a key of its own, as 64 hex digits:
    a resent event is recognised, while a copy of the database alone cannot test guesses
    of the member reference (often a phone number) or the payload it digests."""
    mac = _event_mac().copy()
    mac.update(text.encode())
    return mac.hexdigest()


def same_hash(value: str, stored: str) -> bool:
    """Whether ``value`` hashes to ``stored``, in constant time."""
    return hmac.compare_digest(keyed_hash(value), stored)


def encrypt(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def decrypt(token: str) -> str:
    """The plain text of ``token``; raises ValueError if it was not made with this key."""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("the encrypted field cannot be read with this installation's key") from exc


def forget_keys() -> None:
    """Drop the derived keys (tests that change ``JIFEN_SECRET_KEY``)."""
    _hash_key.cache_clear()
    _fingerprint_key.cache_clear()
    _event_mac.cache_clear()
    _fernet.cache_clear()
