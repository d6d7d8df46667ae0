"""The AI pre-read stage on real files: the stage's own code, real engines, real blobs.

Real images (pydicom's CT and MR, pydicom-data's head CT and chest CR, JPEG 2000 and
JPEG-LS encodings) are stored in a blob store as the de-identification stage would leave
them, and :class:`streams.preread.PreRead` reads them as it does in its process: plan,
admission, decode in a process pool, batch, engine (ONNX Runtime CPU, the embedded
default), result. Findings are painted into real images by the demo generator, so each
test knows which study is positive. Failures are forced for real: a latency budget
nobody can meet, and an ONNX model that fails at run time.
"""

from __future__ import annotations

import asyncio
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
from onnx import TensorProto, helper
from pydicom.data import get_testdata_file

from adapters.blobs import LocalBlobStore
from engines import load_engine
from engines.card import default_models_dir, file_sha256, load_cards
from engines.demo.synthetic import paint_finding
from schemas.events import InferenceStatus, InstanceRef, Priority, SeriesSummary, StudyDeidentified, utcnow
from schemas.settings import AiSettings, RolloutRule
from schemas.topics import INFERENCE_RESULT, INFERENCE_RETRY
from streams import route as routing
from streams.preread import PreRead, Rollout, canary_share, decode_pool, load_slots, plan

T0 = utcnow()


def real(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name, download=False)
    assert path, f"{name} is not installed (pydicom / pydicom-data)"
    return pydicom.dcmread(path)


def encoded(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def study_of(store: LocalBlobStore, uid: str, datasets: list[pydicom.Dataset], site: str = "SITE-PSEUDONYM",
             body_parts: list[str] | None = None) -> StudyDeidentified:
    """A de-identified study event over these instances, stored as the de-identification stage stores them."""
    refs = []
    for number, ds in enumerate(datasets, 1):
        data = encoded(ds)
        blob = store.put(f"deid/{uid}/1/{number}.dcm", data)
        refs.append(InstanceRef(sop_instance_uid=f"{uid}.{number}", series_uid=f"{uid}.1", sop_class_uid=ds.SOPClassUID,
                                transfer_syntax_uid=ds.file_meta.TransferSyntaxUID, blob_uri=blob.uri,
                                blob_size=blob.size, instance_number=number))
    modality = str(datasets[0].Modality)
    return StudyDeidentified(
        trace_id=f"trace-{uid}", study_uid=uid, version=1, patient_pseudonym="PSEUDO", modalities=[modality],
        body_parts=body_parts or [], source_site=site, instance_count=len(refs),
        series=[SeriesSummary(series_uid=f"{uid}.1", instance_count=len(refs), modality=modality)], instances=refs,
        profile_options=["113100"], deidentified_at=T0,
    )


@pytest.fixture(scope="module")
def cards():
    return load_cards(default_models_dir())


def preread_for(store: LocalBlobStore, cards, **ai) -> PreRead:
    settings = AiSettings(backend="onnxruntime-cpu", decode_workers=2, max_batch_delay_ms=2, **ai)
    return PreRead(slots=load_slots(cards, settings, None, load_engine), rollout=Rollout(settings.rollout),
                   ai=settings, fetch=store.get, pool=decode_pool(settings))


def run(preread: PreRead, *studies: StudyDeidentified) -> list:
    async def go():
        try:
            return await asyncio.gather(*(preread.study(s) for s in studies))
        finally:
            for slot in preread.slots.values():
                if slot.batcher is not None:
                    await slot.batcher.stop()

    try:
        return asyncio.run(go())
    finally:
        preread.pool.shutdown()


def the_result(outputs):
    (topic, result), = [o for o in outputs if o[0] is INFERENCE_RESULT]
    return result


def test_real_files_of_every_kind_get_scores_and_painted_findings_are_found(tmp_path: Path, cards) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    head, chest = real("693_UNCR.dcm"), real("RG1_UNCR.dcm")
    studies = {
        "head-ct": study_of(store, "2.25.1", [head]),
        "head-ct-painted": study_of(store, "2.25.2", [paint_finding(head, "hemorrhage", 101)]),
        "head-ct-j2k": study_of(store, "2.25.3", [real("693_J2KR.dcm")]),
        "chest-cr": study_of(store, "2.25.4", [chest], body_parts=["CHEST"]),
        "chest-cr-painted": study_of(store, "2.25.5", [paint_finding(chest, "pneumothorax", 202)], body_parts=["CHEST"]),
        "ct-small": study_of(store, "2.25.6", [real("CT_small.dcm")]),
        "mr-small": study_of(store, "2.25.7", [real("MR_small.dcm")]),
        "mr-jpeg-ls": study_of(store, "2.25.8", [real("MR_small_jpeg_ls_lossless.dcm")]),
        "mr-j2k": study_of(store, "2.25.9", [real("MR_small_jp2klossless.dcm")]),
    }
    results = dict(zip(studies, (the_result(o) for o in run(preread_for(store, cards), *studies.values())), strict=True))
    mr_model = any("MR" in card.applicability.modalities for card in cards)
    for name, result in results.items():
        if name.startswith("mr-") and not mr_model:
            assert result.status is InferenceStatus.NOT_APPLICABLE and "modality MR" in result.reason
            continue
        assert result.status is InferenceStatus.OK, (name, result.reason)
        (model_run,) = result.models
        assert model_run.backend == "onnxruntime-cpu" and len(model_run.model_sha256) == 64
        assert model_run.images == 1 and model_run.scores and all(0 <= s.score <= 1 for s in model_run.scores)
        assert result.latency_ms >= result.infer_ms > 0 and result.decode_ms > 0
    labels = {name: [f.label for f in result.findings] for name, result in results.items()}
    assert labels["head-ct"] == [] and labels["head-ct-j2k"] == [] and labels["chest-cr"] == []
    assert labels["head-ct-painted"] == ["hemorrhage"] and labels["chest-cr-painted"] == ["pneumothorax"]
    bleed = results["head-ct-painted"].findings[0]
    assert bleed.critical and not bleed.silent and bleed.confidence >= bleed.threshold
    assert {c.scheme for c in bleed.codes} >= {"SCT"}
    # JPEG 2000 decodes to the same pixels as the uncompressed original: the same score
    assert results["head-ct-j2k"].models[0].scores == results["head-ct"].models[0].scores


def test_a_study_no_model_reads_is_not_applicable_with_the_reasons(tmp_path: Path, cards) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    us = real("US1_J2KR.dcm") if get_testdata_file("US1_J2KR.dcm", download=False) else real("SC_rgb.dcm")
    study = study_of(store, "2.25.20", [us])
    planned = plan(study, cards, Rollout([]))
    assert not planned.models and len(planned.skipped) == len(cards)
    (result,) = map(the_result, run(preread_for(store, cards), study))
    assert result.status is InferenceStatus.NOT_APPLICABLE and result.models == []
    assert all(card.name in result.reason for card in cards)


def test_a_study_past_its_latency_budget_gets_timeout(tmp_path: Path, cards) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    study = study_of(store, "2.25.30", [real("693_UNCR.dcm")])
    (result,) = map(the_result, run(preread_for(store, cards, latency_budget_s=0.001), study))
    assert result.status is InferenceStatus.TIMEOUT and "latency budget" in result.reason
    assert result.findings == []


def _failing_model(tmp_path: Path) -> Path:
    """A copy of the head-CT model card whose ONNX model fails when run: a Reshape that no
    128x128 image satisfies (ONNX Runtime raises at run time, as a broken engine would)."""
    source = default_models_dir() / "ich_ct_demo"
    target = tmp_path / "models" / "broken"
    shutil.copytree(source, target)
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["flat"]),
         helper.make_node("ReduceMean", ["flat"], ["logits"], axes=[1], keepdims=1)],
        "broken", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 128, 128])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), target / "model.onnx")
    card = (target / "card.yaml").read_text()
    old_sha = next(line for line in card.splitlines() if line.startswith("sha256:"))
    (target / "card.yaml").write_text(card.replace(old_sha, f"sha256: {file_sha256(target / 'model.onnx')}"))
    return target.parent


def test_an_engine_error_is_recorded_and_a_failing_engine_is_taken_out(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    cards = load_cards(_failing_model(tmp_path))
    head = real("693_UNCR.dcm")
    studies = [study_of(store, f"2.25.4{i}", [head]) for i in range(4)]
    preread = preread_for(store, cards, breaker_failures=2, breaker_reset_s=600)

    async def one_by_one():
        try:
            return [the_result(await preread.study(s)) for s in studies]
        finally:
            for slot in preread.slots.values():
                if slot.batcher is not None:
                    await slot.batcher.stop()

    try:
        results = asyncio.run(one_by_one())
    finally:
        preread.pool.shutdown()
    assert all(r.status is InferenceStatus.ERROR for r in results)
    assert "engine error" in results[0].reason and "engine error" in results[1].reason
    # two failures opened the circuit: the next studies are not sent to the engine at all
    assert "taken out after 2 consecutive failures" in results[2].reason and results[2].models[0].images == 0
    model = cards[0].name
    assert REGISTRY.get_sample_value("radstream_engine_circuit_open", {"model": model}) == 1.0


def test_undecodable_pixel_data_is_an_error_with_the_reason(tmp_path: Path, cards) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    study = study_of(store, "2.25.50", [real("693_UNCR.dcm")])
    store.put("deid/2.25.50/1/1.dcm", b"\0" * 128 + b"DICM but not really a DICOM instance")
    (result,) = map(the_result, run(preread_for(store, cards), study))
    assert result.status is InferenceStatus.ERROR and "undecodable pixel data" in result.reason


def test_rollout_silent_off_and_a_stable_canary(cards) -> None:
    rollout = Rollout([RolloutRule(model="*", site="SITE_B", mode="silent"),
                       RolloutRule(model="radstream-demo-ich-ct", site="SITE_C", mode="off"),
                       RolloutRule(model="radstream-demo-ich-ct", site="SITE_D", fraction=0.25)],
                      site_alias=lambda name: f"pseudo-{name}")
    assert rollout.mode("radstream-demo-ich-ct", "SITE_A", "1") == "active"
    assert rollout.mode("radstream-demo-ich-ct", "pseudo-SITE_B", "1") == "silent"  # matched by pseudonym
    assert rollout.mode("radstream-demo-ich-ct", "SITE_C", "1") == "off"
    arms = [rollout.mode("radstream-demo-ich-ct", "SITE_D", f"2.25.{i}") for i in range(2000)]
    assert 0.2 < arms.count("active") / len(arms) < 0.3 and set(arms) == {"active", "silent"}
    assert [rollout.mode("radstream-demo-ich-ct", "SITE_D", f"2.25.{i}") for i in range(50)] == arms[:50]
    assert canary_share("2.25.1", "m") == canary_share("2.25.1", "m")


def test_silent_mode_records_findings_and_leaves_priority_unchanged(tmp_path: Path, cards) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    painted = paint_finding(real("693_UNCR.dcm"), "hemorrhage", 101)
    silent_site = study_of(store, "2.25.60", [painted], site="SITE_SILENT")
    active_site = study_of(store, "2.25.61", [painted], site="SITE_ACTIVE")
    silent, active = (the_result(o) for o in run(
        preread_for(store, cards, rollout=[{"site": "SITE_SILENT", "mode": "silent"}]), silent_site, active_site))
    assert [(f.label, f.silent) for f in silent.findings] == [("hemorrhage", True)]
    assert [(f.label, f.silent) for f in active.findings] == [("hemorrhage", False)]

    # routing (identified zone) sees the same results, re-identified
    from tests.test_stages import _assembled  # a routine identified study

    study = _assembled()
    rules = routing.load_rules()
    for result, expected in ((silent, Priority.ROUTINE), (active, Priority.CRITICAL)):
        linked = result.replace(study_uid=study.study_uid, trace_id=study.trace_id, version=study.version)
        decision, row = routing.route(study, rules, T0, ai=linked, ai_enabled=True)
        assert decision.priority is expected and row.ai_status == "OK"
        assert (row.ai_findings == []) is (expected is Priority.ROUTINE)
    _, pending = routing.route(study, rules, T0, ai=None, ai_enabled=True)
    assert pending.ai_status == "PENDING" and pending.priority is Priority.ROUTINE


def test_a_full_queue_defers_routine_work_to_the_retry_topic_never_drops_it(tmp_path: Path, cards) -> None:
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    head = real("693_UNCR.dcm")
    studies = [study_of(store, f"2.25.7{i}", [head]) for i in range(8)]
    preread = preread_for(store, cards, queue_studies=1)  # 4 lanes, 1 waiting place
    outputs = run(preread, *studies)
    deferred = [o for o in outputs if any(topic is INFERENCE_RETRY for topic, _ in o)]
    done = [o for o in outputs if not any(topic is INFERENCE_RETRY for topic, _ in o)]
    assert len(done) == 5 and len(deferred) == 3
    for out in deferred:
        result = the_result(out)
        assert result.status is InferenceStatus.TIMEOUT and "deferred: AI queue full" in result.reason
        (retry,) = [event for topic, event in out if topic is INFERENCE_RETRY]
        assert retry in studies
    assert all(the_result(o).status is InferenceStatus.OK for o in done)


def test_scores_do_not_depend_on_the_batch_they_ran_in(tmp_path: Path, cards) -> None:
    """Batching across studies must not change a study's score (batch norm folded, no cross-talk)."""
    card = next(c for c in cards if c.name == "radstream-demo-ich-ct")
    engine = load_engine(card, "onnxruntime-cpu")
    from engines.preprocess import preprocess_dataset

    head = real("693_UNCR.dcm")
    images = np.stack([preprocess_dataset(paint_finding(head, "hemorrhage", seed), card)[0] for seed in (1, 2, 3)])
    together = card.scores(engine.run(images))
    alone = np.concatenate([card.scores(engine.run(images[i:i + 1])) for i in range(3)])
    assert np.allclose(together, alone, atol=1e-5)


def test_an_image_outside_the_cards_field_of_view_is_not_applicable_with_the_reason(tmp_path: Path) -> None:
    """A card may say which images it was made for (a whole head, not an 85 mm crop): those
    it was not are left out, and a study with none left is NOT_APPLICABLE, never scored."""
    from engines.card import CardError, load_card

    target = tmp_path / "models" / "ich"
    shutil.copytree(default_models_dir() / "ich_ct_demo", target)
    card_file = target / "card.yaml"
    text = card_file.read_text()
    card_file.write_text(text.replace("  max_slices: 2000\n", "  max_slices: 2000\n  field_of_view_mm: [400, 150]\n", 1))
    with pytest.raises(CardError, match="applicability: .*field_of_view_mm"):
        load_card(card_file)
    card_file.write_text(text.replace("  max_slices: 2000\n", "  max_slices: 2000\n  field_of_view_mm: [150, 400]\n", 1))
    cards = load_cards(tmp_path / "models")
    store = LocalBlobStore(tmp_path / "blobs", fsync=False)
    crop = study_of(store, "2.25.80", [real("CT_small.dcm")])  # 128 x 0.66 mm = 85 mm
    head = study_of(store, "2.25.81", [real("693_UNCR.dcm")])  # 512 x 0.48 mm = 245 mm
    crop_result, head_result = map(the_result, run(preread_for(store, cards), crop, head))
    assert crop_result.status is InferenceStatus.NOT_APPLICABLE and "field of view 85 mm" in crop_result.reason
    assert head_result.status is InferenceStatus.OK
