"""Keyed hashes and field encryption, both from the installation's secret key.

Personal data that staff must be able to look up but that must not leak (phone numbers, ID
numbers) is stored twice: a keyed hash to find it, and an AES-GCM ciphertext (Fernet) to
show it to permitted staff. Secrets that are only ever compared (API key secrets, session
tokens, one-time codes) are stored as keyed hashes alone.

The secret key can be replaced (``JIFEN_SECRET_KEY``) with the old one kept in
``JIFEN_PREVIOUS_SECRET_KEYS``: new hashes and ciphertexts are made with the current key,
while what was made with an old one is still recognised (:func:`keyed_hashes`,
:func:`same_hash`, :func:`request_fingerprints`, :func:`event_fingerprints`) and read
(:func:`decrypt`) until ``jifen keys rekey`` has moved it (:func:`reencrypt`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from jifen.settings import get_settings, previous_secret_keys, secret_key


@lru_cache(maxsize=8)
def _derived(purpose: bytes) -> tuple[bytes, ...]:
    """The key for ``purpose`` derived from the current secret, then from each previous one."""
    settings = get_settings()
    return tuple(
        HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(key)
        for key in (secret_key(settings), *previous_secret_keys(settings))
    )


def _derive(purpose: bytes) -> bytes:
    return _derived(purpose)[0]


_HASH = b"jifen keyed hash v1"
_FINGERPRINT = b"jifen request fingerprint v1"
_EVENT = b"jifen event fingerprint v1"


@lru_cache(maxsize=1)
def _event_macs() -> tuple[hmac.HMAC, ...]:
    """The event fingerprint's HMACs with their keys set up (the current key's first), which
    each event copies rather than set a key up again (ingestion is timed per event)."""
    return tuple(hmac.new(key, digestmod=hashlib.sha256) for key in _derived(_EVENT))


@lru_cache(maxsize=1)
def draw_key() -> bytes:
    """The key that seeds the rules' random draws (HMAC-SHA256): a sender that chooses its
    event ids cannot know which ids win, while whoever holds the installation's secret can
    replay a recorded draw."""
    return _derive(b"jifen rule draws v1")


@lru_cache(maxsize=1)
def _fernets() -> tuple[Fernet, ...]:
    """Field encryption under the current key, then each previous one."""
    keys = _derived(b"jifen field encryption v1")
    return tuple(Fernet(base64.urlsafe_b64encode(key)) for key in keys)


@lru_cache(maxsize=1)
def _fernet() -> MultiFernet:
    """Encrypts with the current key; reads what any of the keys encrypted."""
    return MultiFernet(list(_fernets()))


def _hmac(key: bytes, text: str) -> str:
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def keyed_hash(value: str) -> str:
    """HMAC-SHA256 of ``value`` under the installation's key, as 64 hex digits."""
    return _hmac(_derive(_HASH), value)


def keyed_hashes(value: str) -> list[str]:
    """:func:`keyed_hash` of ``value`` under the current key and each previous one: what a
    lookup matches while stored hashes may still be an old key's."""
    return [_hmac(key, value) for key in _derived(_HASH)]


def request_fingerprint(text: str) -> str:
    """HMAC-SHA256 of a request (method, path, body) under a key of its own, as 64 hex
    digits: a stored fingerprint recognises a replay, while a copy of the database alone
    cannot test guesses of the phone, ID number or password the body held."""
    return _hmac(_derive(_FINGERPRINT), text)


def request_fingerprints(text: str) -> list[str]:
    """:func:`request_fingerprint` of ``text`` under each previous key (not the current one):
    a request stored before the key was replaced is still known when it is sent again."""
    return [_hmac(key, text) for key in _derived(_FINGERPRINT)[1:]]


def event_fingerprint(text: str) -> str:
    """HMAC-SHA256 of an event's canonical text under a key of its own, as 64 hex digits:
    a resent event is recognised, while a copy of the database alone cannot test guesses
    of the member reference (often a phone number) or the payload it digests."""
    mac = _event_macs()[0].copy()
    mac.update(text.encode())
    return mac.hexdigest()


def event_fingerprints(text: str) -> list[str]:
    """:func:`event_fingerprint` of ``text`` under each previous key (not the current one)."""
    found = []
    for base in _event_macs()[1:]:
        mac = base.copy()
        mac.update(text.encode())
        found.append(mac.hexdigest())
    return found


def same_hash(value: str, stored: str) -> bool:
    """Whether ``value`` hashes to ``stored`` under the current key or a previous one, each
    compared in constant time."""
    return any(hmac.compare_digest(digest, stored) for digest in keyed_hashes(value))


def encrypt(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def decrypt(token: str) -> str:
    """The plain text of ``token``; raises ValueError if none of the installation's keys
    (the current one and the previous ones) made it."""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("the encrypted field cannot be read with this installation's key") from exc


def reencrypt(token: str) -> str:
    """``token`` encrypted anew under the current key (the same text; a previous key's
    token is read with it). Raises ValueError as :func:`decrypt` does."""
    try:
        return _fernet().rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise ValueError("the encrypted field cannot be read with this installation's key") from exc


def under_current_key(token: str) -> bool:
    """Whether ``token`` was encrypted under the current key (not a previous one)."""
    try:
        _fernets()[0].decrypt(token.encode())
    except InvalidToken:
        return False
    return True


def rotating() -> bool:
    """Whether previous keys are configured (``JIFEN_PREVIOUS_SECRET_KEYS``)."""
    return len(_derived(_HASH)) > 1


def forget_keys() -> None:
    """Drop the derived keys (after ``JIFEN_SECRET_KEY`` or ``JIFEN_PREVIOUS_SECRET_KEYS``
    changed in the process: tests)."""
    _derived.cache_clear()
    _event_macs.cache_clear()
    draw_key.cache_clear()
    _fernets.cache_clear()
    _fernet.cache_clear()
