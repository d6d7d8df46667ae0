"""Per-site de-identification policy: profile options, burned-in rules, private safe-list.

A TOML file (``deid.policy_file``; the packaged ``schemas/deid/default_policy.toml`` otherwise)
with a ``[defaults]`` table and optional ``[sites.<SOURCE_SITE>]`` tables whose keys
override the defaults for studies from that site. Loaded and validated at start like
the routing rules: an unknown key or option, a malformed tag or UID prefix fails with
the file, the table and the key named.

Options (PS3.15 E.3, with their DCM codes in the De-identification Method Code Sequence):
``retain_longitudinal_modified_dates`` (113107), ``retain_patient_characteristics``
(113108), ``clean_descriptors`` (113105), ``retain_institution_identity`` (113112: the
institution attributes are kept and the events' ``source_site`` names the site; without
it the de-identified zone sees only a keyed site pseudonym). The basic profile (113100)
always applies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from schemas.toml_files import read_toml

#: option name -> (Annex E table column, DCM code, code meaning) (PS3.16 CID 7050)
OPTIONS: dict[str, tuple[str, str, str]] = {
    "retain_longitudinal_modified_dates": (
        "rtn_long_modif_dates", "113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("rtn_pat_chars", "113108", "Retain Patient Characteristics Option"),
    "clean_descriptors": ("clean_desc", "113105", "Clean Descriptors Option"),
    # no column in annex_e.csv: the attributes it keeps are schemas.deid.INSTITUTION_IDENTITY
    "retain_institution_identity": ("", "113112", "Retain Institution Identity Option"),
}
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
SAFE_PRIVATE_CODE = ("113111", "Retain Safe Private Option")

_KEYS = {"options", "burned_in_modalities", "burned_in_sop_classes", "burned_in_safe", "private_safe",
         "keep_uid_prefixes", "descriptor_terms"}
_UID_PREFIX = re.compile(r"^[0-9]+(\.[0-9]+)*\.?$")
_HEX = re.compile(r"^(0x)?[0-9A-Fa-f]{1,4}$")


class PolicyError(ValueError):
    """The policy file is invalid; the message names the table and key."""


@dataclass(frozen=True)
class BurnedInSafeRule:
    """A site rule saying instances of this modality / SOP class carry no burned-in PHI."""

    id: str
    modalities: frozenset[str] = frozenset()
    sop_classes: frozenset[str] = frozenset()

    def matches(self, modality: str | None, sop_class: str | None) -> bool:
        return ((not self.modalities or (modality or "").upper() in self.modalities)
                and (not self.sop_classes or sop_class in self.sop_classes))


@dataclass(frozen=True)
class SitePolicy:
    options: frozenset[str]
    burned_in_modalities: frozenset[str]
    burned_in_sop_classes: tuple[str, ...]  # prefixes
    burned_in_safe: tuple[BurnedInSafeRule, ...]
    private_safe: frozenset[tuple[int, str, int]]  # (group, creator, element low byte)
    keep_uid_prefixes: tuple[str, ...]
    descriptor_terms: frozenset[str]

    @property
    def retains_institution(self) -> bool:
        """Retain Institution Identity Option (PS3.15 E.3.11): the site may be named downstream."""
        return "retain_institution_identity" in self.options

    @property
    def codes(self) -> list[tuple[str, str]]:
        """(code value, meaning) of the profile and every applied option, for the method sequence."""
        codes = [BASIC_PROFILE_CODE] + [OPTIONS[o][1:] for o in sorted(self.options)]
        if self.private_safe:
            codes.append(SAFE_PRIVATE_CODE)
        return codes


@dataclass(frozen=True)
class Policy:
    defaults: SitePolicy
    sites: dict[str, SitePolicy]
    source: str

    def for_site(self, source_site: str | None) -> SitePolicy:
        return self.sites.get((source_site or "").upper(), self.defaults)


def default_policy_path() -> Path:
    return Path(str(resources.files("schemas").joinpath("deid", "default_policy.toml")))


def load_policy(path: Path | None = None) -> Policy:
    path = Path(path or default_policy_path())
    return parse_policy(read_toml(path, "de-identification policy file", PolicyError), str(path))


def parse_policy(data: dict[str, Any], source: str = "<policy>") -> Policy:
    if extra := set(data) - {"defaults", "sites"}:
        raise PolicyError(f"{source}: unknown top-level keys {sorted(extra)}; known: ['defaults', 'sites']")
    raw_defaults = data.get("defaults", {})
    defaults = _site(raw_defaults, {}, source, "defaults")
    sites = {name.upper(): _site(raw, raw_defaults, source, f"sites.{name}") for name, raw in data.get("sites", {}).items()}
    return Policy(defaults, sites, source)


def _site(raw: dict[str, Any], base: dict[str, Any], source: str, table: str) -> SitePolicy:
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: [{table}] must be a table")
    if extra := set(raw) - _KEYS:
        raise PolicyError(f"{source}: [{table}] has unknown keys {sorted(extra)}; known: {sorted(_KEYS)}")
    merged = {**base, **raw}

    def strings(key: str) -> list[str]:
        value = merged.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PolicyError(f"{source}: [{table}] {key} must be a list of strings")
        return value

    options = strings("options")
    if unknown := set(options) - set(OPTIONS):
        raise PolicyError(f"{source}: [{table}] options {sorted(unknown)} unknown; known: {sorted(OPTIONS)}")
    for key in ("burned_in_sop_classes", "keep_uid_prefixes"):
        for prefix in strings(key):
            if not _UID_PREFIX.match(prefix):
                raise PolicyError(f"{source}: [{table}] {key} entry {prefix!r} is not a UID or UID prefix")
    safe_rules = []
    for number, rule in enumerate(merged.get("burned_in_safe", []), start=1):
        if not isinstance(rule, dict) or not rule.get("id") or set(rule) - {"id", "modality", "sop_class"}:
            raise PolicyError(f"{source}: [{table}] burned_in_safe rule {number} needs an id and only modality/sop_class")
        if "modality" not in rule and "sop_class" not in rule:
            raise PolicyError(f"{source}: [{table}] burned_in_safe rule {rule['id']!r} matches everything; "
                              "give a modality or sop_class")
        safe_rules.append(BurnedInSafeRule(
            id=str(rule["id"]), modalities=frozenset(m.upper() for m in _as_list(rule.get("modality"))),
            sop_classes=frozenset(_as_list(rule.get("sop_class")))))
    private = set()
    for number, entry in enumerate(merged.get("private_safe", []), start=1):
        if not isinstance(entry, dict) or set(entry) != {"group", "creator", "element"}:
            raise PolicyError(f"{source}: [{table}] private_safe entry {number} needs exactly group, creator, element")
        group, element = str(entry["group"]), str(entry["element"])
        if not _HEX.match(group) or int(group, 16) % 2 == 0 or not _HEX.match(element) or int(element, 16) > 0xFF:
            raise PolicyError(f"{source}: [{table}] private_safe entry {number}: group must be an odd hex group "
                              f"and element the low byte (00-FF), got {group!r}/{element!r}")
        private.add((int(group, 16), str(entry["creator"]).strip(), int(element, 16)))
    from schemas.deid import descriptor_terms

    return SitePolicy(
        options=frozenset(options),
        burned_in_modalities=frozenset(m.upper() for m in strings("burned_in_modalities")),
        burned_in_sop_classes=tuple(strings("burned_in_sop_classes")),
        burned_in_safe=tuple(safe_rules),
        private_safe=frozenset(private),
        keep_uid_prefixes=tuple(strings("keep_uid_prefixes")),
        descriptor_terms=descriptor_terms() | {t.upper() for t in strings("descriptor_terms")},
    )


def _as_list(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])
