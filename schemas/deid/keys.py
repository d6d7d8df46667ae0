"""Keyed derivations: de-identified UIDs, patient pseudonyms and per-patient date shifts.

Everything is an HMAC-SHA256 under one secret (``deid.key`` / ``deid.key_file``; by
default 32 random bytes created once at ``DATA_DIR/secrets/deid.key``, mode 0600), with
a distinct label per purpose. So every worker process, and every restart, that holds
the same key maps an original UID to the same de-identified UID and a patient to the
same pseudonym, with no coordination and no table to share; without the key nobody
can recompute the mapping (HMAC is a PRF), which a plain hash of a UID would allow.

UIDs are ``2.25.<decimal of the first 128 bits>`` (PS3.5 B.2: a UUID-derived UID; at most
44 characters, within the 64 of PS3.5 9.1).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
from datetime import date, timedelta
from functools import lru_cache
from pathlib import Path

from schemas.settings import Settings

KEY_BYTES = 32
#: dates move back by 1..MAX_SHIFT_DAYS days, the same for every study of a patient
MAX_SHIFT_DAYS = 3652


class DeidKeyError(ValueError):
    """The de-identification key is missing, unreadable or too short."""


class DeidKeys:
    """Derivations under one secret; thread-safe (pure functions of the key)."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < KEY_BYTES:
            raise DeidKeyError(f"de-identification key has {len(secret)} bytes; at least {KEY_BYTES} are needed")
        self._secret = secret
        self.uid = lru_cache(maxsize=65536)(self._uid)
        self.key_id = hmac.new(secret, b"radstream-deid:key-id", hashlib.sha256).hexdigest()[:12]

    def __repr__(self) -> str:  # never print the secret
        return f"DeidKeys(key_id={self.key_id})"

    def _mac(self, label: bytes, value: str) -> bytes:
        return hmac.new(self._secret, label + b"\x00" + value.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()

    def _uid(self, original: str) -> str:
        """The de-identified UID of ``original`` (PS3.15 E.1.1 action U)."""
        return "2.25." + str(int.from_bytes(self._mac(b"uid", original.strip("\x00 "))[:16], "big"))

    def pseudonym(self, issuer: str | None, patient_id: str | None) -> str:
        """Stable patient pseudonym from (IssuerOfPatientID, PatientID): 24 hex digits.

        Prior comparison matches a patient's studies on it without seeing the identifier.
        """
        return "P" + self._mac(b"patient", f"{issuer or ''}\x00{patient_id or ''}").hex()[:24].upper()

    def site_pseudonym(self, source_site: str) -> str:
        """The keyed stand-in for a site in the de-identified zone: ``S`` + 12 hex digits.

        PS3.15 Annex E removes institution and station identity; the calling AE title or
        site name is both. Stable per key, so a site's studies still group together."""
        return "S" + self._mac(b"site", source_site.strip().upper()).hex()[:12].upper()

    def date_shift(self, issuer: str | None, patient_id: str | None) -> timedelta:
        """How far back this patient's dates move (Retain Longitudinal Temporal Information
        with Modified Dates, PS3.15 E.3.6): intervals between a patient's studies survive."""
        raw = int.from_bytes(self._mac(b"dateshift", f"{issuer or ''}\x00{patient_id or ''}")[:4], "big")
        return timedelta(days=-(raw % MAX_SHIFT_DAYS + 1))


def shift_date(value: str, shift: timedelta) -> str | None:
    """Shift a DA value ``YYYYMMDD``; None when it is not a full date (then it is removed)."""
    value = value.strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        return (date(int(value[:4]), int(value[4:6]), int(value[6:])) + shift).strftime("%Y%m%d")
    except ValueError:
        return None


def key_path(settings: Settings) -> Path:
    return (settings.deid.key_file or settings.data_dir / "secrets" / "deid.key").resolve()


def load_keys(settings: Settings) -> DeidKeys:
    """The key from ``deid.key`` (hex), else from ``deid.key_file``, creating it on first use.

    Creation is atomic (temp file + ``os.link``, which fails if another process won the
    race), so two workers starting together end up with the one same key.
    """
    if settings.deid.key is not None:
        try:
            return DeidKeys(bytes.fromhex(settings.deid.key.get_secret_value()))
        except ValueError as exc:
            raise DeidKeyError(f"deid.key (RADSTREAM_DEID_KEY) must be hex: {exc}") from None
    path = key_path(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".deid-key-")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process created it first: use theirs
        finally:
            os.unlink(tmp)
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise DeidKeyError(f"cannot read de-identification key {path}: {exc}") from None
    if path.stat().st_mode & 0o077:
        raise DeidKeyError(f"de-identification key {path} is readable by others; chmod 600 it")
    return DeidKeys(secret)
