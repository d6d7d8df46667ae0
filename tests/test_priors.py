"""Prior comparison on pydicom's dicomdirtests trees, de-identified by the real engine.

Patient 98890234: a CT in 2001 (coronary calcium scoring, "SmartScore") and three MR
studies on one day in 2003 (Brain, Brain-MRA, Carotids); patient 77654033: a head CT in
1995 and a C-spine CR in 2001. Every study goes through ``deid.engine.deidentify_instance``
first, so the stage sees what it sees in production: keyed pseudonyms, shifted dates and
cleaned descriptions. The AI results are stand-ins (the demo models' names and labels).
"""

from __future__ import annotations

import dataclasses
import io
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import pydicom.data
import pytest
from pydicom import dcmread

from deid.engine import deidentify_instance
from schemas.codec import Codec
from schemas.deid.keys import DeidKeys
from schemas.deid.policy import load_policy
from schemas.events import (
    Finding,
    InferenceResult,
    InferenceStatus,
    LabelScore,
    ModelRun,
    PriorComparison,
    SeriesSummary,
    StudyDeidentified,
)
from schemas.priors import BodyRegion, PriorsTableError, load_tables
from schemas.topics import PRIORS_RESULT_BY_PATIENT, PRIORS_STUDY_BY_PATIENT
from streams.priors import (
    FindingComparison,
    PriorRules,
    PriorsState,
    body_regions,
    by_patient,
    compare_findings,
    rekey_result,
    rekey_study,
    result_arrives,
    study_arrives,
    summarise_study,
)

TREES = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests"
KEYS = DeidKeys(bytes(range(32)))
#: the packaged policy, with the words a site adds to its Clean Descriptors vocabulary
#: (anatomy and a product name; never a name or an identifier)
POLICY = dataclasses.replace(load_policy().defaults,
                             descriptor_terms=load_policy().defaults.descriptor_terms | {"CAROTIDS", "SMARTSCORE"})
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)
RULES = PriorRules(load_tables())


def deidentified_studies(folder: str, policy=POLICY) -> dict[str, StudyDeidentified]:
    """Every study under ``folder``, de-identified, by its original StudyDescription (or Modality)."""
    by_study: dict[str, list] = {}
    for path in sorted((TREES / folder).rglob("*")):
        if path.is_file():
            result = deidentify_instance(path.read_bytes(), policy, KEYS)
            header = dcmread(io.BytesIO(result.data), stop_before_pixels=True)
            original = dcmread(path, stop_before_pixels=True)
            by_study.setdefault(result.study_uid, []).append((result, header, original))
    studies = {}
    for uid, members in by_study.items():
        first, header, original = members[0]
        series = {}
        for result, _, _ in members:
            series.setdefault(result.series_uid, SeriesSummary(
                series_uid=result.series_uid, instance_count=0, modality=result.modality,
                body_part_examined=result.body_part_examined, series_description=result.series_description))
        studies[original.get("StudyDescription") or original.Modality] = StudyDeidentified(
            trace_id=f"trace-{uid[-8:]}", study_uid=uid, version=1, patient_pseudonym=first.patient_pseudonym,
            modalities=sorted({r.modality for r, _, _ in members if r.modality}),
            body_parts=sorted({r.body_part_examined.upper() for r, _, _ in members if r.body_part_examined}),
            source_site="SITEPSEUDO", instance_count=len(members), series=list(series.values()), instances=[],
            profile_options=["113100"], deidentified_at=T0 + first.date_shift,
            study_description=first.study_description,
            # what the de-identification stage passes on: the de-identified header's StudyDate/Time
            study_date=header.get("StudyDate") or None, study_time=header.get("StudyTime") or None)
    return studies


@pytest.fixture(scope="module")
def mr_patient() -> dict[str, StudyDeidentified]:
    studies = deidentified_studies("98892001") | deidentified_studies("98892003")
    assert sorted(studies) == ["Brain", "Brain-MRA", "CT", "Carotids"]
    return studies


@pytest.fixture(scope="module")
def spine_patient() -> dict[str, StudyDeidentified]:
    studies = deidentified_studies("77654033")
    assert sorted(studies) == ["CT, HEAD/BRAIN WO CONTRAST", "XR C Spine Comp Min 4 Views"]
    return studies


def arrive(studies: list[StudyDeidentified], rules: PriorRules = RULES, state: PriorsState | None = None):
    """The stage's step over studies in arrival order: the state, and every comparison published."""
    published: list[PriorComparison] = []
    for study in studies:
        state, found = study_arrives(state, study, rules)
        published += found
    return state, published


def latest(published: list[PriorComparison], study: StudyDeidentified) -> PriorComparison:
    return [c for c in published if c.study_uid == study.study_uid][-1]


def reasons(comparison: PriorComparison, studies: dict[str, StudyDeidentified]) -> dict[str, tuple[bool, str]]:
    name = {s.study_uid: n for n, s in studies.items()}
    return {name[p.study_uid]: (p.relevant, p.reason) for p in comparison.priors}


def result(study: StudyDeidentified, model: str, label: str, score: float, *, critical=False, silent=False,
           version: int = 1) -> InferenceResult:
    findings = [Finding(label=label, model=model, model_version="1", confidence=score, threshold=0.5,
                        critical=critical, silent=silent, codes=[])] if score >= 0.5 else []
    run = ModelRun(model=model, model_version="1", model_sha256="0" * 64, backend="onnxruntime-cpu",
                   status=InferenceStatus.OK, silent=silent, images=1,
                   scores=[LabelScore(label=label, score=score, threshold=0.5)])
    return InferenceResult(trace_id=study.trace_id, study_uid=study.study_uid, version=version,
                           status=InferenceStatus.OK, findings=findings, models=[run], level=3, images=1,
                           queued_ms=0, decode_ms=0, infer_ms=0, latency_ms=1,
                           inferred_at=study.deidentified_at + timedelta(seconds=2))


def test_the_real_files_are_what_the_issue_says(mr_patient, spine_patient) -> None:
    # keyed pseudonyms: one per patient, the same for each of their studies
    assert len({s.patient_pseudonym for s in mr_patient.values()}) == 1
    assert len({s.patient_pseudonym for s in spine_patient.values()}) == 1
    # dates shifted per patient: the intervals survive (2001-01-01 -> 2003-05-05 is 854 days)
    ct, brain = mr_patient["CT"], mr_patient["Brain"]
    assert ct.study_date != "20010101" and brain.study_date != "20030505"
    assert (datetime.strptime(brain.study_date, "%Y%m%d") - datetime.strptime(ct.study_date, "%Y%m%d")).days == 854
    assert body_regions(brain, RULES.tables) == {BodyRegion("Head")}  # StudyDescription BRAIN
    assert body_regions(mr_patient["Carotids"], RULES.tables) == {BodyRegion("Neck")}
    assert body_regions(ct, RULES.tables) == {BodyRegion("Chest", "Heart")}  # SeriesDescription SmartScore
    assert body_regions(mr_patient["Brain-MRA"], RULES.tables) == set()  # "Brain-MRA" is cleaned away
    cspine = spine_patient["XR C Spine Comp Min 4 Views"]
    assert body_regions(cspine, RULES.tables) == {BodyRegion("Spine", "Cervical spine")}


def test_each_later_study_lists_its_earlier_studies_with_the_rule_or_the_reason(mr_patient) -> None:
    order = [mr_patient[n] for n in ("CT", "Brain", "Brain-MRA", "Carotids")]
    _, published = arrive(order)
    assert reasons(latest(published, mr_patient["CT"]), mr_patient) == {}
    assert reasons(latest(published, mr_patient["Brain"]), mr_patient) == {
        "CT": (False, "different body region: Chest (Heart) vs Head")}
    assert reasons(latest(published, mr_patient["Brain-MRA"]), mr_patient) == {
        "Brain": (True, "same modality MR; body region of the current study unknown"),
        "CT": (False, "body region of the current study unknown and modality differs: CT vs MR")}
    carotids = latest(published, mr_patient["Carotids"])
    assert reasons(carotids, mr_patient) == {
        "Brain-MRA": (True, "same modality MR; body region of the prior unknown"),
        "Brain": (True, "adjacent region Head ~ Neck: head and neck imaging overlap (skull base; vessels: brain and "
                        "carotid angiography); same modality MR"),
        "CT": (False, "different body region: Chest (Heart) vs Neck")}
    assert [p.rule for p in carotids.priors] == ["same-modality", "adjacent-region", "other-region"]
    assert carotids.relevant_priors == 2 and carotids.body_regions == ["Neck"]
    assert carotids.summary == "2 relevant priors (of 3 earlier studies), latest MR the same day"
    assert [p.days_before for p in carotids.priors] == [0, 0, 854]
    for comparison in published:  # every event is valid for its topic
        assert Codec().decode(Codec().encode(comparison), PriorComparison) == comparison


def test_with_the_packaged_vocabulary_unknown_regions_fall_back_to_the_modality() -> None:
    # Clean Descriptors drops "Carotids" and "SmartScore": no region is left, the modality decides
    plain = deidentified_studies("98892001", load_policy().defaults) | deidentified_studies("98892003", load_policy().defaults)
    _, published = arrive([plain[n] for n in ("CT", "Brain", "Brain-MRA", "Carotids")])
    assert reasons(latest(published, plain["Carotids"]), plain) == {
        "Brain-MRA": (True, "same modality MR; body regions of both studies unknown"),
        "Brain": (True, "same modality MR; body region of the current study unknown"),
        "CT": (False, "body regions of both studies unknown and modality differs: CT vs MR")}


def test_c_spine_and_head_are_not_each_others_priors_and_the_look_back_window_applies(spine_patient) -> None:
    head, cspine = spine_patient["CT, HEAD/BRAIN WO CONTRAST"], spine_patient["XR C Spine Comp Min 4 Views"]
    _, published = arrive([head, cspine])
    (prior,) = latest(published, cspine).priors
    assert (prior.relevant, prior.rule, prior.reason) == (
        False, "other-region", "different body region: Head vs Spine (Cervical spine)")
    assert prior.days_before == 1947 and prior.modalities == ["CT"]
    _, published = arrive([head, cspine], dataclasses.replace(RULES, look_back_days=1000))
    (prior,) = latest(published, cspine).priors
    assert (prior.relevant, prior.rule, prior.reason) == (
        False, "look-back", "outside the look-back window: 1947 days before, window 1000 days")


def test_only_the_last_n_relevant_priors_are_taken(mr_patient) -> None:
    order = [mr_patient[n] for n in ("CT", "Brain", "Brain-MRA", "Carotids")]
    _, published = arrive(order, dataclasses.replace(RULES, max_priors=1))
    carotids = latest(published, mr_patient["Carotids"])
    assert carotids.relevant_priors == 1
    assert reasons(carotids, mr_patient)["Brain"] == (False, "not among the last 1 relevant priors (adjacent region "
                                                             "Head ~ Neck: head and neck imaging overlap (skull base; "
                                                             "vessels: brain and carotid angiography); same modality MR)")
    assert [p.rule for p in carotids.priors] == ["same-modality", "last-n", "other-region"]


def test_a_prior_sent_after_the_current_study_updates_its_comparison(mr_patient) -> None:
    carotids, brain = mr_patient["Carotids"], mr_patient["Brain"]
    state, first = arrive([carotids])
    assert [(c.study_uid, c.revision, c.relevant_priors) for c in first] == [(carotids.study_uid, 1, 0)]
    state, late = arrive([brain], state=state)
    # the late prior gets its own comparison, and the later study a new revision listing it
    assert [(c.study_uid, c.revision) for c in late] == [(brain.study_uid, 1), (carotids.study_uid, 2)]
    assert late[1].relevant_priors == 1 and late[1].priors[0].rule == "adjacent-region"
    assert late[1].compared_at >= first[0].compared_at
    # the same events again (a replay) publish nothing new
    assert arrive([carotids, brain], state=state)[1] == []
    # a new version of the prior (a late instance) is compared again, and named in the later study's list
    state, again = study_arrives(state, brain.replace(version=2), RULES)
    assert [(c.study_uid, c.version, c.revision) for c in again] == [(brain.study_uid, 2, 2), (carotids.study_uid, 1, 3)]
    assert study_arrives(state, brain.replace(version=2), RULES)[1] == []


def test_ai_findings_new_resolved_persistent_and_score_changes(mr_patient) -> None:
    brain, mra, carotids = mr_patient["Brain"], mr_patient["Brain-MRA"], mr_patient["Carotids"]
    state, _ = arrive([brain, mra, carotids])
    state, _ = result_arrives(state, by_patient(result(brain, "mr_brain_demo", "lesion", 0.81), brain.patient_pseudonym), RULES)
    state, found = result_arrives(state, by_patient(result(mra, "mr_brain_demo", "lesion", 0.34), mra.patient_pseudonym), RULES)
    on_mra = latest(found, mra)
    assert on_mra.compared_with == brain.study_uid
    assert (on_mra.new_findings, on_mra.resolved_findings, on_mra.persistent_findings) == ([], ["lesion"], [])
    assert on_mra.changed_findings == ["lesion 0.81 -> 0.34 (-0.47, mr_brain_demo)"]
    assert "resolved lesion" in on_mra.summary
    # the carotid MR has no result yet: its relevant priors' findings are a follow-up
    on_carotids = latest(found, carotids)
    assert on_carotids.follow_up == ["the prior of the same day had lesion: this study's AI result is pending"]
    assert on_carotids.follow_up_due


def test_a_persistent_critical_finding_on_a_follow_up_head_ct_is_flagged(spine_patient) -> None:
    head = spine_patient["CT, HEAD/BRAIN WO CONTRAST"]
    # the same real head CT as a follow-up three days later (a new study of the same patient)
    follow_up = head.replace(study_uid=head.study_uid + ".1", trace_id="trace-follow-up",
                             study_date=(datetime.strptime(head.study_date, "%Y%m%d") + timedelta(days=3)).strftime("%Y%m%d"))
    state, published = arrive([head, follow_up])
    assert latest(published, follow_up).priors[0].reason == (
        "same body region Head (BodyPartExamined HEAD); same modality CT")
    for study, score in ((head, 0.7), (follow_up, 0.93)):
        state, published = result_arrives(
            state, by_patient(result(study, "ich_ct_demo", "hemorrhage", score, critical=True), head.patient_pseudonym), RULES)
    comparison = latest(published, follow_up)
    assert comparison.persistent_findings == ["hemorrhage"] and comparison.new_findings == []
    assert comparison.changed_findings == ["hemorrhage 0.70 -> 0.93 (+0.23, ich_ct_demo)"]
    assert comparison.follow_up == ["persistent critical finding hemorrhage (also on the prior of 3 days before)"]
    assert comparison.summary == ("1 relevant prior (of 1 earlier study), latest CT 3 days before; "
                                  "AI vs the prior of 3 days before: persistent hemorrhage")


def test_silent_models_never_count_and_an_unread_label_is_not_new(spine_patient) -> None:
    head = spine_patient["CT, HEAD/BRAIN WO CONTRAST"]
    prior = result(head, "ich_ct_demo", "hemorrhage", 0.2)
    silent = result(head, "ich_ct_demo", "hemorrhage", 0.9, silent=True)
    assert compare_findings(silent, prior) == FindingComparison(new=[], resolved=[], persistent=[], changed=[])
    other_model = result(head, "other_model", "hemorrhage", 0.1)
    current = result(head, "ich_ct_demo", "hemorrhage", 0.8)
    assert compare_findings(current, other_model).new == []  # the prior was never read for it
    assert compare_findings(current, prior).new == ["hemorrhage"]


def test_a_result_before_its_study_waits_and_state_round_trips(spine_patient) -> None:
    head = spine_patient["CT, HEAD/BRAIN WO CONTRAST"]
    early = result(head, "ich_ct_demo", "hemorrhage", 0.7, critical=True)
    # re-keying by patient: the result waits for its study, then follows it
    keyed, out = rekey_result(None, early)
    assert out == [] and keyed.waiting == [early]
    keyed, out = rekey_study(keyed, head)
    assert [spec for spec, _ in out] == [PRIORS_STUDY_BY_PATIENT, PRIORS_RESULT_BY_PATIENT]
    assert out[0][1].instances == [] and out[1][1].patient_pseudonym == head.patient_pseudonym
    # and the priors stage holds a result that comes before its study
    state, found = result_arrives(None, out[1][1], RULES)
    assert found == [] and list(state.waiting) == [head.study_uid]
    state, found = study_arrives(state, out[0][1], RULES)
    assert state.studies[head.study_uid].ai_status == "OK" and state.waiting == {}
    assert PriorsState.from_dict(state.to_dict()) == state  # the table codec keeps every field


def test_region_tables_are_validated_and_extended_by_a_site(tmp_path) -> None:
    extra = tmp_path / "regions.csv"
    extra.write_text("source,modality,term,region,focus\nkeyword,MR,MRA,Head,\n")
    tables = load_tables(regions_file=extra)
    study = StudyDeidentified(trace_id="t", study_uid="2.25.1", version=1, patient_pseudonym="P1", modalities=["MR"],
                              body_parts=[], source_site="S", instance_count=1, series=[], instances=[],
                              profile_options=[], deidentified_at=T0, study_description="MRA")
    assert body_regions(study, tables) == {BodyRegion("Head")}
    assert summarise_study(study, tables).regions[0].evidence == "StudyDescription MRA"
    extra.write_text("source,modality,term,region,focus\nkeyword,,MRA,Brainstem,\n")
    with pytest.raises(PriorsTableError, match=r"regions.csv line 2: region 'Brainstem'"):
        load_tables(regions_file=extra)
    bad = tmp_path / "adjacency.csv"
    bad.write_text("region_a,region_b,note\nHead,Chest,\n")
    with pytest.raises(PriorsTableError, match="every adjacent pair says why"):
        load_tables(adjacency_file=bad)


def test_the_steps_are_what_the_table_applies(mr_patient) -> None:
    # register() runs study_arrives through TypedTable.apply with the rules bound
    step = partial(study_arrives, rules=RULES)
    state, found = step(None, mr_patient["Brain"])
    assert state.patient_pseudonym == mr_patient["Brain"].patient_pseudonym and len(found) == 1


def test_register_declares_the_rekey_and_the_priors_stage_with_their_tables(tmp_path) -> None:
    from schemas.settings import load_settings
    from streams import priors
    from streams.app import create_app

    app, _ = create_app(load_settings(data_dir=tmp_path), stages=(priors,))
    assert sorted(app.agents) == ["priors", "priors-rekey"]
    assert sorted(app.tables) == ["priors-by-patient", "priors-patient-of-study"]
