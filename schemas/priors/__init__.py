"""Prior relevance as data: body regions of a study, and which regions are relevant to each other.

``body_regions.csv`` maps DICOM BodyPartExamined (0018,0015) values (PS3.16 Annex L defined
terms), words of the study and series descriptions, and a few modalities to body regions in
the style of the LOINC/RSNA Radiology Playbook (BODY_REGION, with an ANATOMIC_FOCUS where it
decides relevance: the cervical and the lumbar spine are both "Spine" but not each other's
priors). ``region_adjacency.csv`` lists the pairs of different regions that are still
relevant priors for each other. No standard defines relevance (no IHE profile does); these
tables are the whole of the rules, and a site extends them with ``priors.regions_file`` and
``priors.adjacency_file`` (same columns), validated at load: a bad row fails with its file
and line.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

#: the body regions a mapping row may name (Radiology Playbook BODY_REGION values, abridged)
REGIONS = frozenset({
    "Head", "Neck", "Chest", "Breast", "Abdomen", "Pelvis", "Spine", "Upper extremity", "Lower extremity",
    "Whole body",
})
SOURCES = frozenset({"body_part", "keyword", "modality"})
ANY_REGION = "*"

_REGION_COLUMNS = ("source", "modality", "term", "region", "focus")
_ADJACENCY_COLUMNS = ("region_a", "region_b", "note")
_WORD = re.compile(r"[A-Z0-9]+")


class PriorsTableError(ValueError):
    """A body-region or adjacency table is invalid; the message names the file and line."""


@dataclass(frozen=True, order=True)
class BodyRegion:
    """A Playbook-style body region, with an anatomic focus where one is known."""

    region: str
    focus: str | None = None

    def __str__(self) -> str:
        return f"{self.region} ({self.focus})" if self.focus else self.region


@dataclass(frozen=True)
class RegionTerm:
    source: str  # body_part | keyword | modality
    modality: str | None  # None: any modality
    term: str  # upper case; empty for a modality row
    region: BodyRegion


@dataclass(frozen=True)
class Adjacency:
    region_a: str  # "Region" or "Region/Focus" or "*"
    region_b: str
    note: str

    def joins(self, a: BodyRegion, b: BodyRegion) -> bool:
        return (_names(self.region_a, a) and _names(self.region_b, b)) or (
            _names(self.region_a, b) and _names(self.region_b, a))


def _names(pattern: str, region: BodyRegion) -> bool:
    if pattern == ANY_REGION:
        return True
    name, _, focus = pattern.partition("/")
    return name == region.region and (not focus or focus == region.focus)


@dataclass(frozen=True)
class RelevanceTables:
    """Everything the relevance rules read: the region terms and the adjacent pairs."""

    terms: tuple[RegionTerm, ...]
    adjacency: tuple[Adjacency, ...]

    def lookup(self, source: str, term: str, modality: str | None) -> list[BodyRegion]:
        """Regions of one value; rows for the study's modality come before rows for any."""
        term, modality = term.upper(), (modality or "").upper()
        hits = [row for row in self.terms if row.source == source and row.term == term
                and row.modality in (None, modality)]
        hits.sort(key=lambda row: row.modality is None)
        return list(dict.fromkeys(row.region for row in hits))

    def adjacent(self, a: BodyRegion, b: BodyRegion) -> Adjacency | None:
        return next((pair for pair in self.adjacency if pair.joins(a, b)), None)


def words(text: str | None) -> list[str]:
    """The words of a description as the keyword rows match them ("Brain-MRA" -> BRAIN, MRA)."""
    return _WORD.findall((text or "").upper())


def _rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriorsTableError(f"{path}: cannot be read: {exc}") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise PriorsTableError(f"{path}: no header line; expected {','.join(columns)}")
    reader = csv.DictReader([line for _, line in lines])
    if tuple(reader.fieldnames or ()) != columns:
        raise PriorsTableError(f"{path} line {lines[0][0]}: columns are {reader.fieldnames}; expected {list(columns)}")
    return [(number, {k: (v or "").strip() for k, v in row.items()}) for (number, _), row in zip(lines[1:], reader)]


def _region_terms(path: Path) -> list[RegionTerm]:
    terms = []
    for line, row in _rows(path, _REGION_COLUMNS):
        where = f"{path} line {line}"
        if row["source"] not in SOURCES:
            raise PriorsTableError(f"{where}: source {row['source']!r} is not one of {sorted(SOURCES)}")
        if row["region"] not in REGIONS:
            raise PriorsTableError(f"{where}: region {row['region']!r} is not one of {sorted(REGIONS)}")
        if row["source"] == "modality" and (not row["modality"] or row["term"]):
            raise PriorsTableError(f"{where}: a modality row names a modality and no term")
        if row["source"] != "modality" and not _WORD.fullmatch(row["term"].upper()):
            raise PriorsTableError(f"{where}: term {row['term']!r} must be one word of letters and digits")
        terms.append(RegionTerm(source=row["source"], modality=row["modality"].upper() or None,
                                term=row["term"].upper(), region=BodyRegion(row["region"], row["focus"] or None)))
    return terms


def _adjacency(path: Path) -> list[Adjacency]:
    pairs = []
    for line, row in _rows(path, _ADJACENCY_COLUMNS):
        for key in ("region_a", "region_b"):
            name = row[key].partition("/")[0]
            if row[key] != ANY_REGION and name not in REGIONS:
                raise PriorsTableError(f"{path} line {line}: {key} {row[key]!r} names no region of {sorted(REGIONS)}")
        if not row["note"]:
            raise PriorsTableError(f"{path} line {line}: every adjacent pair says why (note)")
        pairs.append(Adjacency(row["region_a"], row["region_b"], row["note"]))
    return pairs


def _packaged(name: str) -> Path:
    return Path(str(resources.files("schemas.priors").joinpath(name)))


def load_tables(regions_file: Path | None = None, adjacency_file: Path | None = None) -> RelevanceTables:
    """The packaged tables, extended by a site's files (their rows are added, never replace)."""
    terms = _region_terms(_packaged("body_regions.csv"))
    adjacency = _adjacency(_packaged("region_adjacency.csv"))
    if regions_file is not None:
        terms = _region_terms(Path(regions_file)) + terms  # a site's rows are found first
    if adjacency_file is not None:
        adjacency = _adjacency(Path(adjacency_file)) + adjacency
    return RelevanceTables(tuple(terms), tuple(adjacency))
