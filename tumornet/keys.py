"""Keyed ids: what outputs carry instead of patient and scan ids.

Scan ids usually contain the patient's id, so both are replaced by HMAC-SHA256 keyed hashes with
the site's secret (a file of at least 16 bytes, e.g. `openssl rand -hex 32 > site.key`); the site,
holding the secret and its manifest, maps keys back to its scans.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from .errors import InputError

MIN_SECRET_BYTES = 16


def keyed_id(identifier: str, secret: bytes) -> str:
    """Keyed hash of an identifier (HMAC-SHA256, 16 hex chars)."""
    if not secret:
        raise InputError("keyed_id: the site secret is empty")
    return hmac.new(secret, identifier.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


def patient_key(patient_id: str, secret: bytes) -> str:
    return keyed_id(patient_id, secret)


def check_key(value: str, flag: str, what: str = "patient") -> str:
    """A keyed id of a patient or scan (`what`) as the shards hold it (16 lowercase hex characters) ->
    itself; anything else is refused without being echoed (a raw id given by mistake must not reach a
    log)."""
    if not re.fullmatch(r"[0-9a-f]{16}", str(value)):
        raise InputError(f"{flag}: expected the {what}'s keyed id (16 hex characters, as in the shards' "
                         f"{what}_key column), not a raw {what} id")
    return str(value)


def read_secret(path: str | Path) -> bytes:
    """The site's key: a file of at least 16 bytes (surrounding whitespace ignored)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: secret file not found (create one, e.g. `openssl rand -hex 32 > {p.name}`)")
    secret = p.read_bytes().strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise InputError(f"{p}: the secret is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are needed")
    return secret


def ensure_secret(path: str | Path) -> Path:
    """A new random site key at `path` (64 hex chars, owner-only) unless one is there already."""
    import secrets

    p = Path(path)
    if not p.is_file():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(secrets.token_hex(32))
        p.chmod(0o600)
    return p
