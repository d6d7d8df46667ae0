"""PHI-leak scanner for the de-identified zone (``radstream phi-scan``).

Reads every event on every de-identified topic (:data:`schemas.topics.DEIDENTIFIED_TOPICS`
unless told otherwise) from the beginning to the true end of each partition
(:func:`adapters.kafka.end_offsets`: the embedded broker's ListOffsets under-reports, and
a scanner that silently skips events is worse than none), counts what it read against
those ends, decodes every event, and opens
every blob it references, plus every blob under the store's ``deid/`` prefix. It
reports:

* any value containing one of the given PHI canaries (case-insensitive), in any event
  field or in any DICOM attribute at any sequence depth (Pixel Data excepted: pixels
  are the burned-in question, which quarantine answers, and raw pixel bytes would give
  false hits);
* any attribute the site's profile says must be gone: Annex E action X, private
  attributes not on the safe-list, UIDs that are not de-identified (``2.25.``) or
  standard, a missing PatientIdentityRemoved=YES.

Each finding names the topic/partition/offset or blob URI and the attribute.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from schemas.blobs import BlobStore
from schemas.events import Record
from schemas.settings import Settings
from deid.engine import NotDicom, plan_for, read_dataset
from deid.iod import types_for
from schemas.deid.keys import DeidKeys
from schemas.deid.policy import Policy, SitePolicy

#: (0002,0012) names the software that wrote the file, not the patient or the study
_IMPLEMENTATION_CLASS_UID = 0x00020012
_PIXELS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


@dataclass(frozen=True)
class Finding:
    where: str  # "topic[partition]@offset" or a blob URI
    attribute: str  # event field path or "(gggg,eeee) Keyword" path
    problem: str


def load_canaries(path: Path) -> list[str]:
    canaries = [line.strip() for line in Path(path).read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not canaries:
        raise ValueError(f"canary file {path} lists no canaries")
    return canaries


def _needles(canaries: Iterable[str]) -> list[tuple[str, tuple[bytes, ...]]]:
    out = []
    for canary in canaries:
        low = canary.lower()
        forms = {low.encode("utf-8")}
        try:
            forms.add(low.encode("latin-1"))
        except UnicodeEncodeError:
            pass
        out.append((canary, tuple(forms)))
    return out


def scan_event(event: Record, where: str, canaries: Iterable[str]) -> list[Finding]:
    """Canaries in any field of a decoded event (nested records and lists included)."""
    needles = [c.lower() for c in canaries]
    findings = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(sub, f"{path}.{key}" if path else key)
        elif isinstance(value, (list, tuple)):
            for index, sub in enumerate(value):
                walk(sub, f"{path}[{index}]")
        elif isinstance(value, (str, bytes)):
            text = value.lower() if isinstance(value, str) else value.decode("latin-1").lower()
            for needle, canary in zip(needles, canaries, strict=True):
                if needle in text:
                    findings.append(Finding(where, path, f"canary {canary!r}"))

    canaries = list(canaries)
    walk(dataclasses.asdict(event), "")
    return findings


def scan_blob(data: bytes, where: str, canaries: Iterable[str], policy: SitePolicy) -> list[Finding]:
    """Canaries and attributes the profile forbids, in one de-identified DICOM blob."""
    try:
        ds = read_dataset(data)
    except NotDicom as exc:
        return [Finding(where, "-", f"not readable as DICOM: {exc}")]
    needles = _needles(canaries)
    plan = plan_for(policy)
    types = types_for(ds)  # an X/Z/D attribute the IOD requires is a dummy or empty, not a leak
    keep_uids = ("2.25.", "1.2.840.10008.", *policy.keep_uid_prefixes)
    findings: list[Finding] = []

    def walk(dataset: Dataset, prefix: str, path: tuple[int, ...] = ()) -> None:
        for tag in dataset.keys():
            tag = int(tag)
            raw = dataset.get_item(tag)
            name = f"{prefix}({tag >> 16:04X},{tag & 0xFFFF:04X})"
            keyword = getattr(dataset[tag], "keyword", "") if tag not in _PIXELS else "PixelData"
            label = f"{name} {keyword}".strip()
            if tag >> 16 & 1 and not _private_safe(dataset, tag, policy):
                findings.append(Finding(where, label, "private attribute not on the safe-list"))
            if plan.action(tag, path, dataset[tag].VR, types) == "X":
                findings.append(Finding(where, label, "Annex E says remove (X), but it is present"))
            element = dataset[tag]
            if element.VR == "SQ":
                for index, item in enumerate(element.value or ()):
                    walk(item, f"{label}[{index}].", (*path, tag))
                continue
            if tag in _PIXELS:
                continue
            value = raw.value if isinstance(raw.value, bytes) else str(element.value).encode("utf-8", "replace")
            low = (value or b"").lower()
            for canary, forms in needles:
                if any(form in low for form in forms):
                    findings.append(Finding(where, label, f"canary {canary!r}"))
            if element.VR == "UI" and element.value and tag != _IMPLEMENTATION_CLASS_UID:
                values = element.value if isinstance(element.value, MultiValue) else [element.value]
                for uid in values:
                    if uid and not str(uid).startswith(keep_uids):
                        findings.append(Finding(where, label, f"UID {uid} is neither de-identified (2.25.) nor standard"))

    walk(ds, "")
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        walk(meta, "meta:", (0x00020000,))
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        findings.append(Finding(where, "(0012,0062) PatientIdentityRemoved", "not YES"))
    return findings


def _private_safe(ds: Dataset, tag: int, policy: SitePolicy) -> bool:
    group, element = tag >> 16, tag & 0xFFFF
    if 0x10 <= element <= 0xFF:
        return any(g == group and c == str(ds[tag].value).strip() for g, c, _ in policy.private_safe)
    creator = group << 16 | element >> 8
    return creator in ds and (group, str(ds[creator].value).strip(), element & 0xFF) in policy.private_safe


def iter_topic(settings: Settings, topic: str, timeout_s: float = 10.0,
               expected: dict[int, int] | None = None) -> Iterator[tuple[int, int, bytes | None]]:
    """(partition, offset, value) of every message now on ``topic``, from the beginning to
    each partition's true end; ``expected`` (if given) receives how many messages each
    partition holds. Raises :class:`TimeoutError` when a partition is not read to its end."""
    from confluent_kafka import Consumer, TopicPartition

    from adapters.kafka import end_offsets

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"{settings.kafka.topic_prefix}.phi-scan",
                         "enable.auto.commit": False, "log_level": 3})
    try:
        metadata = consumer.list_topics(topic, timeout=timeout_s)
        if topic not in metadata.topics or metadata.topics[topic].error is not None:
            return
        partitions = sorted(metadata.topics[topic].partitions)
        true_ends = end_offsets(settings.kafka_bootstrap, [(topic, pid) for pid in partitions], timeout_s)
        ends = {}
        for pid in partitions:
            low, _ = consumer.get_watermark_offsets(TopicPartition(topic, pid), timeout=timeout_s)
            low, high = max(low, 0), true_ends[(topic, pid)]
            if expected is not None:
                expected[pid] = max(high - low, 0)
            if high > low:
                ends[pid] = (low, high)
        if not ends:
            return
        consumer.assign([TopicPartition(topic, pid, low) for pid, (low, _) in ends.items()])
        remaining = {pid for pid in ends}
        deadline = time.monotonic() + timeout_s
        while remaining and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() or msg.offset() >= ends[msg.partition()][1]:
                continue
            deadline = time.monotonic() + timeout_s
            yield msg.partition(), msg.offset(), msg.value()
            if msg.offset() + 1 >= ends[msg.partition()][1]:
                remaining.discard(msg.partition())
        if remaining:
            raise TimeoutError(f"{topic}: partitions {sorted(remaining)} not read to their end in {timeout_s} s")
    finally:
        consumer.close()


@dataclass
class ScanReport:
    events: int = 0
    blobs: int = 0
    findings: list[Finding] = dataclasses.field(default_factory=list)
    #: topic -> (messages read, messages on it counted against the true partition ends)
    read: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return all(done == total for done, total in self.read.values())


def scan(settings: Settings, canaries: list[str], topics: list[str], store: BlobStore, policy: Policy,
         keys: DeidKeys | None = None) -> ScanReport:
    """Scan every event on ``topics`` and every de-identified blob; see the module docstring.

    ``keys`` maps the events' site pseudonyms back to the sites' policies; without them
    every event is checked against the defaults."""
    from schemas.codec import Codec, DecodeError

    codec, report, seen = Codec(settings.kafka.schema_registry_url), ScanReport(), set()
    by_pseudonym = {keys.site_pseudonym(name): site for name, site in policy.sites.items()} if keys else {}
    for topic in topics:
        expected: dict[int, int] = {}
        read = 0
        for partition, offset, value in iter_topic(settings, topic, expected=expected):
            read += 1
            report.read[topic] = (read, sum(expected.values()))
            where = f"{topic}[{partition}]@{offset}"
            try:
                event = codec.decode(value)
            except DecodeError as exc:
                report.findings.append(Finding(where, "-", f"undecodable event: {exc}"))
                continue
            report.events += 1
            report.findings += scan_event(event, where, canaries)
            site_name = getattr(event, "source_site", None)
            site = by_pseudonym.get(site_name) or policy.for_site(site_name)
            for ref in getattr(event, "instances", None) or ():
                if ref.blob_uri in seen:
                    continue
                seen.add(ref.blob_uri)
                report.blobs += 1
                try:
                    data = store.get(ref.blob_uri)
                except Exception as exc:
                    report.findings.append(Finding(ref.blob_uri, "-", f"blob cannot be opened: {exc}"))
                    continue
                report.findings += scan_blob(data, ref.blob_uri, canaries, site)
        report.read[topic] = (read, sum(expected.values()))
        if read != sum(expected.values()):
            report.findings.append(Finding(topic, "-", f"read {read} of {sum(expected.values())} events"))
    for key in store.keys("deid/"):  # blobs no event references count too, on any store
        uri = store.uri_of(key)
        if uri not in seen:
            seen.add(uri)
            report.blobs += 1
            report.findings += scan_blob(store.get(uri), uri, canaries, policy.defaults)
    return report
