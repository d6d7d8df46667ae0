"""Model cards, the ONNX Runtime engine, backend selection and the TensorRT plan cache, for real.

Models are tiny ONNX graphs written here with ``onnx.helper`` (and the shipped demo cards when
they are there). TensorRT-RTX really builds plans on this CPU-only machine; the runtime half
must refuse to start without a GPU, before it touches ``trt.Runtime``.
"""

from __future__ import annotations

import copy
import hashlib
import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from structlog.testing import capture_logs

from engines import (BACKENDS, CardError, EngineUnavailable, available_backends, default_models_dir, load_card,
                     load_cards, load_engine)
from engines.base import ENGINE_BATCH_SECONDS, ENGINE_RUN_ERRORS, CudaDevice, cuda_device
from engines.tensorrt import TensorRTEngine, build_plan, flavour

try:
    cuda_device()
    HAS_GPU = True
except EngineUnavailable:
    HAS_GPU = False
cpu_only = pytest.mark.skipif(HAS_GPU, reason="checks what happens without a GPU")


def write_model(path: Path, *, seed: int = 0, shape: tuple[int, int, int] = (1, 32, 32), n_out: int = 2) -> str:
    """A small conv net (N, C, H, W) -> (N, n_out) with a dynamic batch axis; returns its sha256."""
    rng = np.random.default_rng(seed)
    c = shape[0]
    weights = [numpy_helper.from_array(rng.standard_normal((4, c, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(np.zeros(4, np.float32), "b"),
               numpy_helper.from_array(rng.standard_normal((4, n_out)).astype(np.float32), "g")]
    nodes = [helper.make_node("Conv", ["image", "w", "b"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("MatMul", ["flat", "g"], ["logits"])]
    graph = helper.make_graph(
        nodes, "demo", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def card_dict(sha256: str, name: str = "test-ich-ct") -> dict:
    code = {"scheme": "SCT", "value": "50960005", "meaning": "Hemorrhage"}
    return {
        "name": name, "version": "1.0.0", "model_file": "model.onnx", "sha256": sha256,
        "intended_use": "Test model; not for clinical use.", "clinical_use": False,
        "applicability": {"modalities": ["CT"], "body_parts": ["HEAD", "BRAIN"],
                          "sop_classes": ["1.2.840.10008.5.1.4.1.1.2"], "min_slices": 1, "max_slices": 500},
        "input": {"name": "image", "shape": [1, 32, 32], "dtype": "float32", "max_batch": 8},
        "output": {"name": "logits", "activation": "sigmoid"},
        "preprocessing": {"window": {"center": 40, "width": 80}, "resize": [32, 32],
                          "normalize": {"mean": 0.5, "std": 0.25}},
        "volume": {"slice_selection": "central", "max_slices": 24, "aggregate": "max"},
        "labels": [{"name": "hemorrhage", "threshold": 0.5, "critical": True, "codes": [code]},
                   {"name": "other", "threshold": 0.7, "codes": [code]}],
    }


def write_card(directory: Path, data: dict | None = None, *, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sha = write_model(directory / "model.onnx", seed=seed)
    path = directory / "card.yaml"
    path.write_text(yaml.safe_dump(card_dict(sha) if data is None else data(sha), sort_keys=False))
    return path


@pytest.fixture
def card(tmp_path: Path):
    return load_card(write_card(tmp_path / "test-ich-ct"))


def shipped_cards() -> list:
    return load_cards(default_models_dir()) if default_models_dir().is_dir() else []


# -- cards ------------------------------------------------------------------------------


def test_a_valid_card_loads_with_absolute_model_file_and_tuples(card) -> None:
    assert card.model_file.is_absolute() and card.model_file.name == "model.onnx"
    assert card.path.name == "card.yaml" and card.model_id == "test-ich-ct" and card.not_for_clinical_use
    assert card.input.shape == (1, 32, 32) and card.preprocessing.resize == (32, 32)
    assert card.applicability.modalities == ("CT",) and card.labels[0].codes[0].value == "50960005"
    assert card.volume.slice_selection == "central" and card.preprocessing.window.width == 80
    assert pickle.loads(pickle.dumps(card)) == card  # preprocessing runs in worker processes


def test_the_shipped_demo_cards_validate() -> None:
    cards = shipped_cards()
    if not cards:
        pytest.skip("no demo models shipped under engines/models yet")
    assert [c.name for c in cards] == sorted(c.name for c in cards)
    for shipped in cards:
        assert shipped.not_for_clinical_use and shipped.model_file.is_file()


def _set(path: str, value):
    def change(data: dict) -> None:
        *parents, last = path.split(".")
        for part in parents:
            data = data[int(part)] if part.isdigit() else data[part]
        if value is _DELETE:
            del data[last]
        else:
            data[last] = value
    return change


_DELETE = object()
MISTAKES = {
    "missing key": (_set("intended_use", _DELETE), "intended_use: Field required"),
    "unknown top-level key": (_set("labelz", []), "labelz: unknown key"),
    "unknown nested key (typo)": (_set("preprocessing.windw", {"center": 1, "width": 2}),
                                  "preprocessing.windw: unknown key"),
    "bool as text": (_set("clinical_use", "yes"), "clinical_use: Input should be a valid boolean"),
    "version as a number": (_set("version", 1.0), "version: Input should be a valid string"),
    "threshold out of range": (_set("labels.0.threshold", 1.5), "labels[0].threshold: Input should be less"),
    "resize differs from input shape": (_set("preprocessing.resize", [64, 64]), "preprocessing.resize: [64, 64]"),
    "lower-case modality": (_set("applicability.modalities", ["ct"]), "applicability.modalities[0]:"),
    "shape of two numbers": (_set("input.shape", [32, 32]), "input.shape: must be 3 positive integers [C, H, W]"),
    "central without max_slices": (_set("volume.max_slices", _DELETE), "volume.max_slices: required"),
    "label without codes": (_set("labels.1.codes", []), "labels[1].codes:"),
    "bad activation": (_set("output.activation", "relu"), "output.activation:"),
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_kind_of_card_mistake_names_the_file_and_the_key(tmp_path: Path, mistake: str) -> None:
    change, expected = MISTAKES[mistake]

    def broken(sha: str) -> dict:
        data = copy.deepcopy(card_dict(sha))
        change(data)
        return data

    path = write_card(tmp_path / "m", broken)
    with pytest.raises(CardError) as caught:
        load_card(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert expected in str(caught.value)


def test_a_model_file_that_does_not_match_the_cards_sha256_is_refused(tmp_path: Path) -> None:
    path = write_card(tmp_path / "m")
    write_model(path.parent / "model.onnx", seed=1)  # swapped under the card
    with pytest.raises(CardError, match=rf"^{path}: sha256: model.onnx hashes to [0-9a-f]{{64}}, the card says"):
        load_card(path)


def test_two_cards_with_one_name_are_refused(tmp_path: Path) -> None:
    write_card(tmp_path / "a")
    second = write_card(tmp_path / "b")
    with pytest.raises(CardError, match=rf"^{second.resolve()}: name: 'test-ich-ct' is also the name of"):
        load_cards(tmp_path)


def test_load_cards_sorts_by_name(tmp_path: Path) -> None:
    write_card(tmp_path / "one", lambda sha: card_dict(sha, name="zz-model"))
    write_card(tmp_path / "two", lambda sha: card_dict(sha, name="aa-model"))
    assert [c.name for c in load_cards(tmp_path)] == ["aa-model", "zz-model"]


def test_applicability_gives_the_reason_a_study_is_not_for_this_model(card) -> None:
    ct = "1.2.840.10008.5.1.4.1.1.2"
    assert card.applies_to(["CT"], ["head"], [ct], 30) is None
    assert card.applies_to("CT", (), (), 30) is None  # no BodyPartExamined: not excluded
    assert card.applies_to(["MR"], ["HEAD"], [], 30) == "modality MR not in [CT]"
    assert card.applies_to(["CT"], ["CHEST"], [], 30) == "body part CHEST not in [HEAD, BRAIN]"
    assert "SOP class" in card.applies_to(["CT"], ["HEAD"], ["1.2.840.10008.5.1.4.1.1.4"], 30)
    assert card.applies_to(["CT"], ["HEAD"], [ct], 501) == "501 images > max_slices 500"


def test_scores_apply_the_activation(card) -> None:
    scores = card.scores(np.array([[0.0, 1000.0], [-1000.0, 2.0]]))
    assert scores.dtype == np.float32 and scores.shape == (2, 2)
    np.testing.assert_allclose(scores, [[0.5, 1.0], [0.0, 1 / (1 + np.exp(-2.0))]], rtol=1e-6)
    with pytest.raises(ValueError, match="expected"):
        card.scores(np.zeros((2, 3)))


# -- ONNX Runtime and backend selection --------------------------------------------------------


def test_onnxruntime_cpu_runs_a_batch_and_says_what_it_is(card) -> None:
    engine = load_engine(card, "onnxruntime-cpu", threads=1)
    batch = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    before = ENGINE_BATCH_SECONDS.labels("onnxruntime-cpu", card.name)._sum.get()
    out = engine.run(batch)
    assert out.shape == (3, 2) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_allclose(engine.run(batch[:1]), out[:1], rtol=1e-5)  # batch-independent
    assert ENGINE_BATCH_SECONDS.labels("onnxruntime-cpu", card.name)._sum.get() > before
    identity = engine.identity
    assert (identity.backend, identity.device, identity.model, identity.model_version, identity.precision) == (
        "onnxruntime-cpu", "cpu", card.name, "1.0.0", "fp32")
    assert identity.model_sha256 == card.sha256 and engine.max_batch == 8
    engine.close()


def test_a_batch_the_model_cannot_take_is_refused_and_counted(card) -> None:
    engine = load_engine(card, "onnxruntime-cpu", threads=1)
    errors = ENGINE_RUN_ERRORS.labels("onnxruntime-cpu", card.name, "ValueError")
    before = errors._value.get()
    with pytest.raises(ValueError, match="max_batch is 8"):
        engine.run(np.zeros((9, 1, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"expected \(N, 1, 32, 32\)"):
        engine.run(np.zeros((2, 1, 16, 16), np.float32))
    assert errors._value.get() == before + 2


def test_a_card_naming_a_tensor_the_model_lacks_fails_at_load(tmp_path: Path) -> None:
    def wrong_input(sha: str) -> dict:
        data = card_dict(sha)
        data["input"]["name"] = "pixels"
        return data

    path = write_card(tmp_path / "m", wrong_input)
    with pytest.raises(CardError, match=rf"^{path}: input.name: 'pixels' is not an input of model.onnx"):
        load_engine(load_card(path), "onnxruntime-cpu")


@cpu_only
def test_auto_picks_onnxruntime_cpu_here_and_logs_why_the_others_were_skipped(card, tmp_path: Path) -> None:
    with capture_logs() as logs:
        engine = load_engine(card, "auto", plan_cache=tmp_path / "plans")
    assert engine.identity.backend == "onnxruntime-cpu"
    (selected,) = [entry for entry in logs if entry["event"] == "engine selected"]
    assert selected["backend"] == "onnxruntime-cpu" and set(selected["skipped"]) == {"tensorrt", "onnxruntime-cuda"}
    assert "no usable GPU" in selected["skipped"]["tensorrt"]
    assert "CUDAExecutionProvider" in selected["skipped"]["onnxruntime-cuda"]
    assert not (tmp_path / "plans").exists()  # no plan is built where it could not run


@cpu_only
def test_a_named_backend_that_cannot_run_here_raises_with_the_reason(card, tmp_path: Path) -> None:
    with pytest.raises(EngineUnavailable, match="CUDAExecutionProvider not in onnxruntime's providers"):
        load_engine(card, "onnxruntime-cuda")
    with pytest.raises(EngineUnavailable, match="no usable GPU: cudaGetDeviceCount returned cudaError"):
        load_engine(card, "tensorrt", plan_cache=tmp_path)
    with pytest.raises(ValueError, match="unknown engine backend 'tpu'"):
        load_engine(card, "tpu")
    backends = available_backends()
    assert list(backends) == list(BACKENDS) and backends["onnxruntime-cpu"] is None
    assert backends["tensorrt"] and backends["onnxruntime-cuda"]


# -- TensorRT --------------------------------------------------------------------------


@pytest.fixture
def plan_card(card):
    """A shipped demo model if there is one (a real CNN), else the small test model."""
    cards = shipped_cards()
    return cards[0] if cards else card


def test_build_plan_builds_once_then_reuses_the_cached_plan(plan_card, tmp_path: Path) -> None:
    cache = tmp_path / "plans"
    first = build_plan(plan_card, cache)
    assert first.built and first.path.stat().st_size > 0 and first.seconds > 0
    target = "sm" if HAS_GPU else "cpu-build"
    assert first.key.startswith(f"{plan_card.name}-{plan_card.sha256[:16]}-trt{flavour().version}-{target}")
    assert first.path == cache / f"{first.key}.plan" and first.target in first.key
    mtime = first.path.stat().st_mtime_ns
    again = build_plan(plan_card, cache)
    assert (again.built, again.path, again.seconds) == (False, first.path, 0.0)
    assert again.path.stat().st_mtime_ns == mtime
    assert [p.name for p in cache.iterdir()] == [first.path.name]  # no temporary files left


def test_the_plan_key_changes_with_the_model_hash(tmp_path: Path) -> None:
    a = build_plan(load_card(write_card(tmp_path / "a", seed=0)), tmp_path / "plans")
    b = build_plan(load_card(write_card(tmp_path / "b", seed=1)), tmp_path / "plans")
    assert a.key != b.key and a.path != b.path and b.built


@pytest.mark.skipif(flavour().backend != "tensorrt-rtx", reason="compute-capability targets are TensorRT-RTX's")
def test_an_rtx_plan_for_a_named_gpu_target_builds_without_that_gpu(card, tmp_path: Path) -> None:
    rtx_a6000 = CudaDevice(index=0, name="NVIDIA RTX A6000", major=8, minor=6)
    plan = build_plan(card, tmp_path, device=rtx_a6000)
    assert plan.built and plan.target == "sm86" and plan.key.endswith("-sm86") and plan.path.stat().st_size > 0
    with pytest.raises(EngineUnavailable, match=r"cannot target compute capability 9.0 \(NVIDIA H200\)"):
        build_plan(card, tmp_path, device=CudaDevice(index=0, name="NVIDIA H200", major=9, minor=0))


@cpu_only
def test_the_tensorrt_runtime_refuses_without_a_gpu_before_deserializing(card, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    plan = build_plan(card, tmp_path)

    def tripwire(*args, **kwargs):
        raise AssertionError("trt.Runtime must not be created without a GPU")

    monkeypatch.setattr(flavour().module, "Runtime", tripwire)
    with pytest.raises(EngineUnavailable, match="no usable GPU: cudaGetDeviceCount returned"):
        TensorRTEngine(card, plan)
