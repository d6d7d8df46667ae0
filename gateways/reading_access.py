"""Who may do what through the reading API: the users file, bearer tokens and the role policy.

The users file (``reading.users_file``, TOML) lists every user once::

    [[user]]
    id = "dr-okafor"              # a reader's id is their roster id: their worklist is the roster's
    role = "reader"               # reader | admin | analyst
    sites = ["SITE_A", "SITE_B"]  # source sites whose studies they may see; ["*"]: every site
    token_sha256 = "9f86d0..."    # SHA-256 (hex) of their bearer token; `radstream users token` makes both

Only token hashes are stored: the file can be read by operators without handing out
tokens. Errors name the file and the key (``user[2].role``), like the roster's.

:data:`POLICY` is the role table (RBAC). Permissions on a study also need its source
site among the user's sites: a reader credentialed at SITE_A does not see the AI output
of SITE_B's studies, even by UID. Analysts see the network's aggregates, never a
study's AI output or its patient: they have the reports for that.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from schemas.settings import SettingsError
from schemas.toml_files import read_toml

ROLES = ("reader", "admin", "analyst")
ALL_SITES = "*"

#: role -> what it may do. "own" worklist: the reader's own list; "study" permissions need the study's site.
#: "alerts" lists critical alerts (only those of studies whose AI output the user may view); "alert.ack"
#: acknowledges one: readers of the study's site and admins, who answer for the network's escalations.
POLICY: dict[str, frozenset[str]] = {
    "reader": frozenset({"worklist.own", "study.view", "ai.view", "study.read", "alerts", "alert.ack"}),
    "admin": frozenset({"worklist.any", "worklist.unassigned", "network", "study.view", "ai.view", "alerts",
                        "alert.ack"}),
    "analyst": frozenset({"network"}),
}
#: permissions that hold only for studies of the user's sites
PER_SITE = frozenset({"study.view", "ai.view", "study.read", "alert.ack"})

_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class User:
    id: str
    role: str
    sites: frozenset[str]
    name: str = ""

    def may(self, permission: str, site: str | None = None) -> bool:
        """Whether the role allows ``permission``, and for a study's permission, at ``site``."""
        if permission not in POLICY[self.role]:
            return False
        if permission in PER_SITE:
            return site is not None and (ALL_SITES in self.sites or site in self.sites)
        return True


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """The users of a users file, found by bearer token (compared by hash, in constant time)."""

    def __init__(self, users: dict[str, User]) -> None:
        self._by_hash = users

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, token: str) -> User | None:
        digest = token_sha256(token)
        for known, user in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return user
        return None


def parse_users(data: dict, source: str) -> Users:
    """Validate a parsed users file; SettingsError naming ``source`` and the key otherwise."""
    entries = data.get("user")
    if not isinstance(entries, list) or not entries:
        raise SettingsError(f"users file {source}: needs at least one [[user]] table")
    users: dict[str, User] = {}
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"users file {source}: user[{index}]"
        if not isinstance(entry, dict):
            raise SettingsError(f"{where}: must be a table")
        unknown = set(entry) - {"id", "role", "sites", "token_sha256", "name"}
        if unknown:
            raise SettingsError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        uid, role, sites, digest = entry.get("id"), entry.get("role"), entry.get("sites", []), entry.get("token_sha256")
        if not isinstance(uid, str) or not _ID.match(uid):
            raise SettingsError(f"{where}.id: a lower-case id (a-z 0-9 . _ -) is required, got {uid!r}")
        if uid in seen:
            raise SettingsError(f"{where}.id: {uid!r} appears twice")
        if role not in ROLES:
            raise SettingsError(f"{where}.role: must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(sites, list) or not all(isinstance(s, str) and s for s in sites):
            raise SettingsError(f"{where}.sites: must be a list of source site names (or [\"*\"])")
        if role != "analyst" and not sites:
            raise SettingsError(f"{where}.sites: a {role} needs the sites whose studies they may see")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise SettingsError(f"{where}.token_sha256: must be 64 lower-case hex digits (SHA-256 of the token)")
        if digest in users:
            raise SettingsError(f"{where}.token_sha256: the same token as {users[digest].id!r}")
        seen.add(uid)
        users[digest] = User(id=uid, role=role, sites=frozenset(sites), name=str(entry.get("name", "")))
    return Users(users)


def load_users(path: Path | None) -> Users:
    """The users of ``reading.users_file``; none when it is unset (every request is then refused)."""
    if path is None:
        return Users({})
    return parse_users(read_toml(path, "users file", SettingsError), str(path))


__all__ = ["ALL_SITES", "PER_SITE", "POLICY", "ROLES", "User", "Users", "load_users", "parse_users", "token_sha256"]
