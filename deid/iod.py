"""Combined Annex E actions (X/Z, X/D, X/Z/D, Z/D, X/Z/U*) resolved from the instance's IOD.

PS3.15 Table E.1-1 gives some attributes a combined action: remove (X) unless an empty
value (Z) or a dummy (D) is needed to keep the object conformant -- which depends on the
attribute's Type in the IOD of the instance, and on where in the data set it occurs
(DeviceSerialNumber is Type 3 in General Equipment, Type 1 in Enhanced General
Equipment). :func:`types_for` looks the Type up:

    SOP Class UID -> IOD -> its modules -> the attribute's Type at its path

A module counts when the IOD makes it mandatory (M), or when it is conditional or
user-optional (C, U) and the data set holds one of its top-level attributes that no
mandatory module of the IOD also has (so a shared attribute such as ContentDate does
not, by itself, pull in the stricter Multi-frame Functional Groups module). An
attribute in several counted modules takes its strictest Type. :meth:`IodTypes.action`
then gives: Type 1/1C -> D (a dummy of the VR), Type 2/2C -> Z (empty), Type 3 or not
in the IOD -> X; for Z/D, Type 1/1C -> D, else Z. A sequence is never given a dummy
item (nothing made up could be shown to hold nothing): a Type 1/1C sequence is removed
(emptied for Z/D), as before. An unknown SOP class (private, retired, or absent from the
tables) keeps the strictest action (:func:`schemas.deid.strictest`), as before. X/Z/U*
(reference sequences): Type 1/1C -> kept, its items walked like any sequence's (so their
instance UIDs are remapped, U), Type 2/2C -> Z (empty), else X.

The tables are the DICOM standard's, as generated from it and shipped by highdicom
(PyPI ``highdicom``, ``highdicom/_standard/*.json``): ``sop_class_iod_map.json``,
``iod_module_map.json`` and ``module_attribute_map.json``. highdicom's own loaders
(``highdicom._standard_utils``) are private API; reading the JSON files it ships is
not, as far as a file in a wheel can be relied on, so they are read here with
:mod:`importlib.resources` and a clear error is raised if they are missing. The
22 MB module table is parsed once per process, on first use, and only what the
combined actions need is kept (each module's top-level tags and the Types of the
attributes Table E.1-1 marks with a combined action); per SOP class, and per set of
optional modules present, the result is cached, so an instance costs a few set tests.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from schemas.deid import load_annex_e, strictest

#: the combined actions resolved here: every combined code of Table E.1-1
COMBINED = frozenset({"X/Z", "X/D", "X/Z/D", "Z/D", "X/Z/U*"})
_RANK = {"1": 0, "1C": 1, "2": 2, "2C": 3, "3": 4}
_FILES = ("sop_class_iod_map.json", "iod_module_map.json", "module_attribute_map.json")

#: (tags of the enclosing sequences..., tag of the attribute) -> Type ("1", "1C", "2", "2C", "3")
Types = Mapping[tuple[int, ...], str]


class StandardTablesMissing(RuntimeError):
    """highdicom's copy of the standard's IOD and module tables cannot be read."""


@dataclass(frozen=True)
class _Module:
    top_level: frozenset[int]  # tags of the module's top-level attributes
    types: dict[tuple[int, ...], str]  # combined-action attributes only


@dataclass(frozen=True)
class _Tables:
    iod_of: dict[str, str]  # SOP Class UID -> IOD
    modules_of: dict[str, tuple[tuple[str, str], ...]]  # IOD -> (module, usage M|C|U)
    modules: dict[str, _Module]


def _read(name: str):
    try:
        text = resources.files("highdicom").joinpath("_standard", name).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError, NotADirectoryError) as exc:
        raise StandardTablesMissing(
            f"cannot read highdicom/_standard/{name} ({type(exc).__name__}: {exc}): the DICOM standard's IOD "
            "and module tables that resolve X/Z, X/D, X/Z/D and Z/D come from PyPI highdicom>=0.28; "
            "install it (pip install 'highdicom>=0.28')") from None
    return json.loads(text)


def _combined_tags() -> frozenset[int]:
    tags = set()
    for entry in load_annex_e():
        if entry.basic in COMBINED and not entry.repeating:
            group, element = entry.tag.split(",")
            tags.add(int(group, 16) << 16 | int(element, 16))
    return frozenset(tags)


@cache
def _tables() -> _Tables:
    """The three tables, parsed once per process and reduced to what the resolution needs.

    The cyclic garbage collector is paused meanwhile: the parsed JSON is some 400,000
    short-lived objects without cycles (freed by reference counting as soon as they are
    reduced), so tracing them would be wasted work. Parsing needs ~100 MB for a moment;
    what is kept is under 200 KB."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _reduce(*(_read(name) for name in _FILES))
    finally:
        if enabled:
            gc.enable()


def _reduce(iod_of: dict, iod_modules: dict, attributes: dict) -> _Tables:
    wanted = _combined_tags()
    keyword_tags: dict[str, int | None] = {}

    def tag(keyword: str) -> int | None:
        found = keyword_tags.get(keyword, -1)
        if found == -1:
            found = keyword_tags[keyword] = tag_for_keyword(keyword)
        return found

    modules = {}
    for name, entries in attributes.items():
        top, types = set(), {}
        for entry in entries:
            path, attribute = entry["path"], tag(entry["keyword"])
            if attribute is None:
                continue  # a keyword newer than pydicom's dictionary: cannot occur in a parsed data set
            if not path:
                top.add(attribute)
            if attribute in wanted and entry["type"] in _RANK:
                key = (*(tag(keyword) for keyword in path), attribute)
                if None not in key:
                    types[key] = min(types.get(key, "3"), entry["type"], key=_RANK.__getitem__)
        modules[name] = _Module(frozenset(top), types)
    modules_of = {iod: tuple((m["key"], m["usage"]) for m in listed) for iod, listed in iod_modules.items()}
    return _Tables(dict(iod_of), modules_of, modules)


def _merge(into: dict[tuple[int, ...], str], types: Types) -> None:
    for key, kind in types.items():
        into[key] = min(into.get(key, "3"), kind, key=_RANK.__getitem__)


@lru_cache(maxsize=256)  # SOP class UIDs come from senders: bounded
def _per_class(sop_class: str) -> tuple[dict[tuple[int, ...], str], tuple[tuple[frozenset[int], Types], ...]] | None:
    """For a SOP class: the Types from its mandatory modules, and for each optional module
    that has combined-action attributes, the top-level tags that show it is present with
    its Types; None when the SOP class has no IOD in the tables."""
    tables = _tables()
    listed = tables.modules_of.get(tables.iod_of.get(sop_class, ""))
    if not listed:
        return None
    found = [(tables.modules[name], usage) for name, usage in listed if name in tables.modules]
    mandatory_top = frozenset().union(*(module.top_level for module, usage in found if usage == "M"))
    base: dict[tuple[int, ...], str] = {}
    optional = []
    for module, usage in found:
        if usage == "M":
            _merge(base, module.types)
        elif module.types:
            optional.append((module.top_level - mandatory_top or module.top_level, module.types))
    return base, tuple(optional)


@lru_cache(maxsize=1024)
def _with_optional(sop_class: str, present: tuple[int, ...]) -> Types:
    base, optional = _per_class(sop_class)
    merged = dict(base)
    for index in present:
        _merge(merged, optional[index][1])
    return merged


@dataclass(frozen=True)
class IodTypes:
    """The Types that decide the combined actions of one instance; ``types`` None: IOD unknown."""

    types: Types | None

    def action(self, code: str, key: tuple[int, ...], vr: str) -> str:
        """The action for combined ``code`` of the attribute at ``key`` (enclosing sequence
        tags, then its own tag) with VR ``vr``: D, Z or X; K for a required X/Z/U* sequence,
        whose items the engine then walks (their instance UIDs are remapped, PS3.15 U)."""
        if self.types is None:
            return strictest(code)
        kind = self.types.get(key, "3")
        if code == "X/Z/U*":
            if kind in ("1", "1C"):
                return "K" if vr == "SQ" else "U"
            return "Z" if kind in ("2", "2C") else "X"
        if kind in ("1", "1C"):
            if vr != "SQ":
                return "D"
            return "Z" if code == "Z/D" else "X"
        return "Z" if kind in ("2", "2C") or code == "Z/D" else "X"


UNKNOWN = IodTypes(None)


def types_for(ds: Dataset) -> IodTypes:
    """The Types for this instance's combined actions, from its SOP class and top-level attributes."""
    sop_class = ds.get("SOPClassUID")
    per_class = _per_class(str(sop_class).strip()) if sop_class else None
    if per_class is None:
        return UNKNOWN
    base, optional = per_class
    if not optional:
        return IodTypes(base)
    top = ds.keys()
    present = tuple(index for index, (tags, _) in enumerate(optional) if not top.isdisjoint(tags))
    return IodTypes(_with_optional(str(sop_class).strip(), present))
