"""Password hashes for the portal's sign-in: argon2id (``argon2-cffi``, its own maintained
defaults: RFC 9106's low-memory profile), never the password itself.

``check`` answers in about the same time whether or not a hash is given, so that a sign-in
with an email nobody has takes as long as one with a wrong password (no user enumeration by
timing)."""

from __future__ import annotations

from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

#: A password's bounds, in characters: long enough to resist guessing offline, short enough
#: that hashing one is not a way to burn the server's CPU.
MIN_LENGTH: Final = 12
MAX_LENGTH: Final = 200

_HASHER: Final = PasswordHasher()
# Verified against when there is no hash to check, so that "no such user" costs the same.
_DUMMY: Final = _HASHER.hash("an unguessable placeholder, never anyone's password")


class WeakPassword(ValueError):
    """Not a password the portal keeps (its length); nothing was written."""


def valid(password: str) -> str:
    if not MIN_LENGTH <= len(password) <= MAX_LENGTH:
        raise WeakPassword(
            f"a password has {MIN_LENGTH} to {MAX_LENGTH} characters (a few words will do)"
        )
    return password


def hash_password(password: str) -> str:
    """The argon2id hash of ``password`` (``WeakPassword`` outside the bounds)."""
    return _HASHER.hash(valid(password))


def check(stored: str | None, password: str) -> bool:
    """Whether ``password`` matches ``stored`` (None: nobody's; still costs one hash)."""
    if len(password) > MAX_LENGTH:
        return False
    try:
        return _HASHER.verify(_DUMMY if stored is None else stored, password) and stored is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored: str) -> bool:
    """Whether ``stored`` was made with weaker parameters than today's."""
    return _HASHER.check_needs_rehash(stored)
