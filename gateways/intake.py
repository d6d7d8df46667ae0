"""The one intake of DICOM instances, whatever protocol brought them (C-STORE, STOW-RS).

A protocol handler reads what its protocol gives it (the PS3.10 bytes, and for a
C-STORE the header and the presentation context's transfer syntax) and hands it to
:meth:`InstanceIntake.receive`: validate (:mod:`gateways.validation`), write the
instance to the claim-check blob store, then publish the ``InstanceReceived`` event that
points at it and wait for the broker's acknowledgement, and only once both are durable
return the event; the handler then gives its protocol's success answer. Anything else is an
:class:`InvalidInstance` whose :class:`FailureReason` is both the PS3.4 C-STORE status
and the PS3.18 STOW-RS FailureReason; :meth:`InstanceIntake.refuse` publishes it as a
dead letter carrying the instance (:mod:`gateways.deadletter`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from adapters.telemetry import get_logger
from gateways.deadletter import BROKER_UNAVAILABLE, DeadLetters
from gateways.dicom_wire import DataSetShape
from gateways.publisher import EventPublisher, PublishError
from gateways.validation import (
    FailureReason,
    InstanceUids,
    InvalidInstance,
    check_encoding,
    check_pixel_data,
    check_storable,
    header_int,
    header_text,
    instance_metadata,
    instance_uids,
    read_instance,
)
from schemas.blobs import BlobRef, BlobStore, instance_key, is_valid_uid, pixel_sample_bytes, rejected_key
from schemas.events import InstanceReceived, trace_id_for, utcnow
from schemas.topics import INSTANCE_RECEIVED

slog = get_logger("radstream.gateways.intake")


@dataclass
class Received:
    """What is known about one instance so far; a refusal reports and dead-letters as much as it can."""

    data: bytes = b""  # the PS3.10 file: preamble, ``DICM``, file meta, data set
    study_uid: str | None = None  # once read and valid: the refusal's key and trace id
    sop_class_uid: str | None = None  # as sent, for the protocol's answer
    sop_instance_uid: str | None = None
    blob: BlobRef | None = None  # the claim check, once the instance is stored

    def note(self, header: Dataset) -> None:
        """Remember the header's UIDs as sent, before they are validated."""
        self.sop_class_uid = header_text(header, "SOPClassUID")
        self.sop_instance_uid = header_text(header, "SOPInstanceUID")
        if is_valid_uid(study_uid := header_text(header, "StudyInstanceUID")):
            self.study_uid = study_uid

    @property
    def trace_id(self) -> str | None:
        return trace_id_for(self.study_uid) if self.study_uid else None


class InstanceIntake:
    """Validates, stores and publishes the instances of one gateway (``gateway``: its stage name)."""

    def __init__(self, store: BlobStore, publisher: EventPublisher, gateway: str) -> None:
        self.store = store
        self.publisher = publisher
        self.gateway = gateway
        self.dead_letters = DeadLetters(gateway, publisher, store, rejected_key)

    def receive(self, received: Received, site: str, *, header: Dataset | None = None,
                transfer_syntax: str | None = None, shape: DataSetShape | None = None, calling_ae: str = "",
                called_ae: str = "", check: Callable[[InstanceUids], None] | None = None) -> InstanceReceived:
        """Validate, store and publish the instance ``received.data``; raises :class:`InvalidInstance`.

        ``header`` and ``transfer_syntax``: what the protocol already read (a C-STORE's
        data set header and its presentation context's transfer syntax, PS3.8 9.3.2.2);
        without them the file is read whole and must be complete, of a storage SOP class
        (PS3.4 Annex B) and in a DICOM transfer syntax (PS3.5 Annex A). ``check``: the
        protocol's own conditions on the validated UIDs (the instance a C-STORE request
        announced, PS3.4 B.2.1; the study of a STOW-RS URL, PS3.18 10.5.1). ``site`` is
        the ``source_site``, ``calling_ae``/``called_ae`` the association's AE titles.
        ``shape``: the walk of :func:`gateways.validation.check_encoding`, where the protocol
        already made it in ``transfer_syntax``.
        """
        if header is None:
            header = read_instance(received.data)
        received.note(header)
        # The walk over the encoded elements: whole, each element once (PS3.5 7.1). A C-STORE
        # knows its transfer syntax first (so a cut-short data set is called that before its
        # UIDs are judged); a STOW-RS part's comes from its file meta, once that is valid.
        if shape is None and transfer_syntax is not None:
            shape = check_encoding(received.data, transfer_syntax)
        uids = instance_uids(header)
        if transfer_syntax is None:
            transfer_syntax = check_storable(header, uids.sop_class_uid)
        check_pixel_data(header, shape or check_encoding(received.data, transfer_syntax), transfer_syntax)
        if check is not None:
            check(uids)
        key = instance_key(uids.study_uid, uids.series_uid, uids.sop_instance_uid)
        received_at, metadata = utcnow(), instance_metadata(header)
        # The claim check first, then the event that points at it: a consumer may read the
        # event as soon as the broker has it (assembly completes a study at its last instance,
        # de-identification then reads every blob), so the blob must be there before. Success
        # is answered only once both are durable. Were they overlapped, the produce's ~4-15 ms
        # would hide under the upload, but an event could name a blob not yet (or, if the upload
        # then failed, never) stored: measured, about one study in a run of the 4-association
        # benchmark was dead-lettered "BlobNotFound" by de-identification.
        received.blob = blob = self._store(key, received,
                                           pixel_sample_bytes(header_int(header, "BitsAllocated"), transfer_syntax))
        instance = InstanceReceived(
            trace_id=trace_id_for(uids.study_uid), study_uid=uids.study_uid, series_uid=uids.series_uid,
            sop_instance_uid=uids.sop_instance_uid, sop_class_uid=uids.sop_class_uid,
            transfer_syntax_uid=transfer_syntax, blob_uri=blob.uri, blob_size=blob.size, blob_sha256=blob.sha256,
            source_site=site, gateway=self.gateway, received_at=received_at, calling_ae=calling_ae,
            called_ae=called_ae, **metadata,
        )
        self._publish(instance)
        slog.info("stored instance", gateway=self.gateway, trace_id=instance.trace_id, study_uid=uids.study_uid,
                  sop_instance_uid=uids.sop_instance_uid, modality=instance.modality, calling_ae=calling_ae or None,
                  source_site=site, bytes=blob.size)
        return instance

    def _store(self, key: str, received: Received, sample_bytes: int) -> BlobRef:
        # In this thread, not a pool's: obstore and LZ4 release the GIL, and handing each put
        # to a pool thread cost the gateway ~5 % of its CPU in thread wake-ups.
        try:
            return self.store.put(key, received.data, sample_bytes=sample_bytes)
        except Exception as exc:  # received.blob stays None: the dead letter carries the bytes themselves
            raise InvalidInstance(FailureReason.OUT_OF_RESOURCES, "blob_store_failed",
                                  f"cannot store the instance: {exc}") from None

    def _publish(self, instance: InstanceReceived) -> None:
        # If the publish fails after the upload, the blob stays with no event: the sender is
        # told to retry (0xA700) and its retry writes the same key. A re-sent instance (same
        # UIDs) overwrites its own key and is published again: consumers key on
        # sop_instance_uid, so a duplicate is idempotent.
        try:
            self.publisher.publish(INSTANCE_RECEIVED, instance)
        except PublishError as exc:
            # The broker is the dead-letter channel too: the refusal is only logged, and
            # the sender retries; its retry overwrites the same blob key.
            raise InvalidInstance(FailureReason.OUT_OF_RESOURCES, BROKER_UNAVAILABLE, str(exc)) from None

    def refuse(self, received: Received, refusal: InvalidInstance) -> None:
        """Dead-letter a refused instance: by its blob when it was stored, else its bytes. Never raises."""
        self.dead_letters.send(refusal.reason, refusal.error, key=received.study_uid, trace_id=received.trace_id,
                               refused=received.data, payload_uri=received.blob.uri if received.blob else None)
