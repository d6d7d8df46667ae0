"""The shipped demo models on real DICOM files: painted finding -> positive, untouched -> negative.

Real images from pydicom-data (head CT 693_UNCR, chest CR RG1_UNCR, MONOCHROME1) and pydicom's
brain MR (MR_small, also as JPEG 2000 and JPEG-LS lossless) go through
the production path: bytes -> engines.preprocess -> ONNX Runtime CPU engine -> card scores.
The finding is painted into the real pixels by engines.demo.synthetic.paint_finding, with
seeds the training never used (training draws synthetic images, never these files).
"""

from __future__ import annotations

import pickle
from io import BytesIO
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from engines import load_card, load_engine
from engines.card import default_models_dir
from engines.demo.synthetic import paint_finding, samples
from engines.preprocess import Undecodable, aggregate, preprocess_dataset, preprocess_instance, select_instances

MODELS = default_models_dir()
ICH_CARD = MODELS / "ich_ct_demo" / "card.yaml"
PTX_CARD = MODELS / "ptx_cr_demo" / "card.yaml"
MR_CARD = MODELS / "mr_brain_demo" / "card.yaml"
#: one brain-MR slice, stored three ways: uncompressed, JPEG 2000 lossless, JPEG-LS lossless
MR_FILES = ("MR_small.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm")
PAINT_SEEDS = (101, 202, 303)


def pydicom_file(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom / pydicom-data)")
    return str(path)


def to_bytes(dataset: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _model(card_file):
    card = load_card(card_file)
    engine = load_engine(card, "onnxruntime-cpu", threads=1)
    yield card, engine
    engine.close()


@pytest.fixture(scope="module")
def ich():
    yield from _model(ICH_CARD)


@pytest.fixture(scope="module")
def ptx():
    yield from _model(PTX_CARD)


@pytest.fixture(scope="module")
def lesion_mr():
    yield from _model(MR_CARD)


def image_scores(card, engine, instances: list[bytes]) -> np.ndarray:
    """(n_images, n_labels) scores of the instances, every frame through preprocess_instance."""
    batch = np.stack([frame for data in instances for frame in preprocess_instance(data, card)])
    return card.scores(engine.run(batch))


def study_score(card, engine, instances: list[tuple[float, bytes]]) -> np.ndarray:
    chosen = select_instances(instances, card.volume)
    return aggregate(image_scores(card, engine, chosen), card.volume)


# ---------------------------------------------------------------- the shipped cards and files

@pytest.mark.parametrize("card_path", [ICH_CARD, PTX_CARD, MR_CARD], ids=["ich", "ptx", "mr"])
def test_shipped_card_says_demo_and_not_for_clinical_use(card_path):
    card = load_card(card_path)  # validates the schema and the model file's sha256
    assert card.not_for_clinical_use and not card.clinical_use
    assert "synthetic" in card.intended_use and "NOT FOR CLINICAL USE" in card.intended_use
    assert card.model_file.stat().st_size < 2 * 1024 * 1024
    assert tuple(card.preprocessing.resize) == tuple(card.input.shape[1:])


def test_cards_carry_the_codes_of_their_findings():
    ich, ptx = load_card(ICH_CARD), load_card(PTX_CARD)
    assert [label.name for label in ich.labels] == ["hemorrhage"]
    assert ("SCT", "50960005") in {(c.scheme, c.value) for c in ich.labels[0].codes}
    assert {("SCT", "36118008"), ("RADLEX", "RID5352")} <= {(c.scheme, c.value) for c in ptx.labels[0].codes}
    assert ich.labels[0].critical and ptx.labels[0].critical
    mr = load_card(MR_CARD)
    assert [label.name for label in mr.labels] == ["lesion"] and not mr.labels[0].critical
    assert {("SCT", "52988006"), ("RADLEX", "RID38780")} <= {(c.scheme, c.value) for c in mr.labels[0].codes}


def test_mr_card_applies_to_brain_mr_without_a_body_part_and_scales_per_image():
    mr = load_card(MR_CARD)
    real = pydicom.dcmread(pydicom_file("MR_small.dcm"), stop_before_pixels=True)
    assert "BodyPartExamined" not in real  # hence no body_parts on the card
    assert mr.applies_to([real.Modality], [], [real.SOPClassUID], 1) is None
    assert mr.applies_to(["MR"], ["HEAD"], ["1.2.840.10008.5.1.4.1.1.4.1"], 1) is None  # Enhanced MR
    assert mr.applies_to(["CT"], [], [], 1) is not None
    assert mr.preprocessing.window is None  # MR has no absolute units: min/max per image


# ---------------------------------------------------------------- head CT

def test_real_head_ct_without_finding_scores_below_threshold(ich):
    card, engine = ich
    data = open(pydicom_file("693_UNCR.dcm"), "rb").read()
    assert image_scores(card, engine, [data])[0, 0] < card.labels[0].threshold


def test_small_field_of_view_ct_without_finding_scores_below_threshold(ich):
    """pydicom's CT_small: an 85 mm crop (0.66 mm pixels) with no skull ring, bone and soft tissue.

    The first model saw only whole synthetic head slices and called it a haemorrhage (1.0);
    training now includes zoomed-in views and skull-less fields of both classes.
    """
    card, engine = ich
    data = open(pydicom_file("CT_small.dcm"), "rb").read()
    assert image_scores(card, engine, [data])[0, 0] < card.labels[0].threshold


def test_small_field_of_view_ct_has_no_brain_to_paint_a_hemorrhage_into():
    """CT_small shows a vertebra, muscle and fat, no brain enclosed by skull, so paint_finding
    cannot put a haemorrhage in it (and there is no painted-positive case for it)."""
    with pytest.raises(ValueError, match="no brain tissue"):
        paint_finding(pydicom.dcmread(pydicom_file("CT_small.dcm")), "hemorrhage", PAINT_SEEDS[0])


@pytest.mark.parametrize("seed", PAINT_SEEDS)
def test_hemorrhage_painted_into_real_head_ct_scores_above_threshold(ich, seed):
    card, engine = ich
    painted = paint_finding(pydicom.dcmread(pydicom_file("693_UNCR.dcm")), "hemorrhage", seed)
    assert painted.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert image_scores(card, engine, [to_bytes(painted)])[0, 0] >= card.labels[0].threshold


def shifted_volume(dataset: pydicom.Dataset, lesion_slice: pydicom.Dataset | None, n: int = 9):
    """A pseudo-volume: the real slice shifted by a few pixels per position, one slice replaced."""
    slices = []
    for index in range(n):
        source = lesion_slice if (lesion_slice is not None and index == n // 2) else dataset
        shifted = pydicom.dcmread(BytesIO(to_bytes(source)))
        offset = index - n // 2
        pixels = np.roll(shifted.pixel_array, (offset * 2, -offset), axis=(0, 1))
        shifted.set_pixel_data(pixels, shifted.PhotometricInterpretation, int(shifted.BitsStored))
        shifted.InstanceNumber = index + 1
        slices.append((float(index * 5.0), to_bytes(shifted)))
    return slices[::-1]  # arrival order is not slice order


def test_head_ct_study_score_over_slices_follows_the_card_volume_rule(ich):
    card, engine = ich
    real = pydicom.dcmread(pydicom_file("693_UNCR.dcm"))
    threshold = card.labels[0].threshold
    negative = study_score(card, engine, shifted_volume(real, None))
    positive = study_score(card, engine, shifted_volume(real, paint_finding(real, "hemorrhage", PAINT_SEEDS[0])))
    assert negative.shape == positive.shape == (1,)
    assert negative[0] < threshold <= positive[0]


# ---------------------------------------------------------------- chest CR (MONOCHROME1)

def test_real_chest_cr_without_finding_scores_below_threshold(ptx):
    card, engine = ptx
    data = open(pydicom_file("RG1_UNCR.dcm"), "rb").read()
    assert pydicom.dcmread(BytesIO(data)).PhotometricInterpretation == "MONOCHROME1"
    assert image_scores(card, engine, [data])[0, 0] < card.labels[0].threshold


@pytest.mark.parametrize("seed", PAINT_SEEDS)
def test_pneumothorax_painted_into_real_chest_cr_scores_above_threshold(ptx, seed):
    card, engine = ptx
    painted = paint_finding(pydicom.dcmread(pydicom_file("RG1_UNCR.dcm")), "pneumothorax", seed)
    assert painted.PhotometricInterpretation == "MONOCHROME1"
    assert image_scores(card, engine, [to_bytes(painted)])[0, 0] >= card.labels[0].threshold


# ---------------------------------------------------------------- brain MR (no absolute units)

@pytest.mark.parametrize("name", MR_FILES)
def test_real_brain_mr_without_finding_scores_below_threshold(lesion_mr, name):
    card, engine = lesion_mr
    data = open(pydicom_file(name), "rb").read()
    assert image_scores(card, engine, [data])[0, 0] < card.labels[0].threshold


@pytest.mark.parametrize("seed", PAINT_SEEDS)
@pytest.mark.parametrize("name", MR_FILES)
def test_lesion_painted_into_real_brain_mr_scores_above_threshold(lesion_mr, name, seed):
    card, engine = lesion_mr
    painted = paint_finding(pydicom.dcmread(pydicom_file(name)), "mr_brain", seed)
    assert painted.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert image_scores(card, engine, [to_bytes(painted)])[0, 0] >= card.labels[0].threshold


def test_brain_mr_score_does_not_depend_on_the_scanner_scale(lesion_mr):
    """Min/max scaling: the same slice stored at a quarter of the values scores the same."""
    card, engine = lesion_mr
    real = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    painted = paint_finding(real, "lesion", PAINT_SEEDS[0])
    for dataset in (real, painted):
        quarter = pydicom.dcmread(BytesIO(to_bytes(dataset)))
        quarter.set_pixel_data((quarter.pixel_array // 4).astype(np.int16), "MONOCHROME2", 16)
        full, small = image_scores(card, engine, [to_bytes(dataset), to_bytes(quarter)])[:, 0]
        assert abs(full - small) < 0.05


# ---------------------------------------------------------------- preprocessing on pydicom's files

@pytest.mark.parametrize("name", [
    "CT_small.dcm",                   # little-endian explicit, signed, rescaled
    "MR_small.dcm",
    "693_J2KR.dcm",                   # JPEG 2000 lossless (pylibjpeg-openjpeg)
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless (pylibjpeg-libjpeg)
    "emri_small_RLE.dcm",             # RLE, multi-frame
    "SC_rgb.dcm",                     # colour -> luminance
    "SC_rgb_2frame.dcm",              # colour, multi-frame
    "SC_rgb_jpeg_dcmtk.dcm",          # JPEG baseline, YBR
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless (pydicom-data)
])
@pytest.mark.parametrize("card_path", [ICH_CARD, PTX_CARD, MR_CARD], ids=["ich", "ptx", "mr"])
def test_preprocess_gives_finite_arrays_of_the_card_shape(name, card_path):
    card = load_card(card_path)
    data = open(pydicom_file(name), "rb").read()
    frames = preprocess_instance(data, card)
    expected_frames = int(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
    assert len(frames) == expected_frames
    for frame in frames:
        assert frame.shape == tuple(card.input.shape) and frame.dtype == np.float32
        assert np.isfinite(frame).all()


def test_jpeg2000_and_uncompressed_head_ct_preprocess_alike(ich):
    card, _ = ich
    uncompressed = preprocess_instance(open(pydicom_file("693_UNCR.dcm"), "rb").read(), card)[0]
    lossless = preprocess_instance(open(pydicom_file("693_J2KR.dcm"), "rb").read(), card)[0]
    np.testing.assert_allclose(uncompressed, lossless, atol=1e-5)


def test_window_is_applied_in_hounsfield_units(ich):
    card, _ = ich
    real = pydicom.dcmread(pydicom_file("693_UNCR.dcm"))
    frame = preprocess_dataset(real, card)[0]
    normalize = card.preprocessing.normalize
    unit = frame * normalize.std + normalize.mean
    assert unit.min() >= -1e-6 and unit.max() <= 1 + 1e-6
    assert (unit < 0.01).mean() > 0.3  # air outside the head is below the window


def test_monochrome1_is_inverted_so_lungs_are_darker_than_mediastinum(ptx):
    card, _ = ptx
    frame = preprocess_dataset(pydicom.dcmread(pydicom_file("RG1_UNCR.dcm")), card)[0][0]
    h, w = frame.shape
    lung = frame[int(0.3 * h):int(0.5 * h), int(0.2 * w):int(0.3 * w)].mean()
    mediastinum = frame[int(0.3 * h):int(0.5 * h), int(0.47 * w):int(0.53 * w)].mean()
    assert lung < mediastinum


def test_a_jpeg_the_decoders_reject_fails_as_undecodable_and_nothing_else(ich):
    """pydicom's JPEG-lossy.dcm is a 12-bit JPEG Extended file that pylibjpeg and Pillow refuse here."""
    card, _ = ich
    try:
        frames = preprocess_instance(open(pydicom_file("JPEG-lossy.dcm"), "rb").read(), card)
    except Undecodable as exc:
        assert "1.2.840.10008.1.2.4.51" in str(exc)  # the reason names the transfer syntax
    else:  # a decoder that can read it (e.g. GDCM) is installed
        assert all(np.isfinite(frame).all() for frame in frames)


def test_garbage_and_pixel_less_instances_are_undecodable(ich):
    card, _ = ich
    with pytest.raises(Undecodable):
        preprocess_instance(b"not dicom at all" * 20, card)
    header_only = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    del header_only.PixelData
    with pytest.raises(Undecodable, match="no pixel data"):
        preprocess_instance(to_bytes(header_only), card)


# ---------------------------------------------------------------- volume rules

def test_central_and_uniform_slice_selection_read_slices_in_position_order():
    instances = [(float(position), f"slice{position}") for position in (5, 1, 9, 3, 7, 0, 2, 8, 4, 6)]
    central = SimpleNamespace(slice_selection="central", max_slices=4)
    uniform = SimpleNamespace(slice_selection="uniform", max_slices=4)
    everything = SimpleNamespace(slice_selection="all", max_slices=4)
    assert select_instances(instances, central) == ["slice3", "slice4", "slice5", "slice6"]
    assert select_instances(instances, uniform) == ["slice0", "slice3", "slice6", "slice9"]
    assert len(select_instances(instances, everything)) == 10
    assert select_instances([(None, "b"), (2.0, "a")], central) == ["a", "b"]


def test_aggregate_max_mean_and_top_k_mean():
    scores = np.array([[0.1, 0.9], [0.5, 0.2], [0.3, 0.4]], np.float32)
    np.testing.assert_allclose(aggregate(scores, SimpleNamespace(aggregate="max")), [0.5, 0.9])
    np.testing.assert_allclose(aggregate(scores, SimpleNamespace(aggregate="mean")), [0.3, 0.5])
    np.testing.assert_allclose(aggregate(scores, SimpleNamespace(aggregate="top_k_mean", top_k=2)), [0.4, 0.65])
    with pytest.raises(ValueError):
        aggregate(np.zeros((0, 2)), SimpleNamespace(aggregate="max"))


# ---------------------------------------------------------------- the generator

def test_synthetic_samples_are_reproducible_and_balanced():
    first = list(samples("hemorrhage", 4, seed=7))
    again = list(samples("hemorrhage", 4, seed=7))
    assert [label for *_, label in first] == [0, 1, 0, 1]
    for (a, _, _), (b, _, _) in zip(first, again):
        np.testing.assert_array_equal(a, b)
    raw, attrs, _ = next(samples("pneumothorax", 1, seed=7))
    assert attrs["monochrome1"] and raw.min() >= 0 and raw.ndim == 2
    first = list(samples("mr_brain", 4, seed=7))
    assert [label for *_, label in first] == [0, 1, 0, 1]
    for (a, attrs, _), (b, _, _) in zip(first, samples("lesion", 4, seed=7)):
        np.testing.assert_array_equal(a, b)
        assert a.min() >= 0 and a.ndim == 2 and not attrs["monochrome1"]


def test_preprocessing_travels_to_a_worker_process_by_pickle(ich):
    """The pre-read runs preprocess_instance in a ProcessPoolExecutor: function and card must pickle."""
    card, _ = ich
    function, card_copy = pickle.loads(pickle.dumps((preprocess_instance, card)))
    data = open(pydicom_file("CT_small.dcm"), "rb").read()
    np.testing.assert_array_equal(function(data, card_copy)[0], preprocess_instance(data, card)[0])
