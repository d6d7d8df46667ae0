"""Train the three shipped demo models on synthetic images: ``python -m engines.demo.train``.

Why it exists: the AI pre-read needs real ONNX models to run end to end (ONNX Runtime on
CPU, TensorRT on GPU), and shipping clinical weights is neither possible nor the point. So
three tiny CNNs (~30k parameters each) are trained here, reproducibly (fixed seeds, one CPU
thread), on images from `engines.demo.synthetic` prepared by the production
`engines.preprocess.prepare_frame`, and exported as opset-17 ONNX graphs with a dynamic
batch axis. The graph is written with `onnx.helper` from the trained weights (batch norm
folded into the convolutions), so the file does not depend on torch's exporter of the day.
Each run writes ``<out>/<model>/model.onnx`` and ``card.yaml`` (with the file's sha256 and
the validation figures in ``intended_use``) and prints the same figures.

Figures of the shipped models (seed 0, defaults: 3000 training and 600 validation images,
20 epochs, 29,321 parameters, one thread of a shared 2-core machine; the run is byte-for-byte
reproducible, same ONNX sha256 on a second run):

  ich_ct_demo    4500 training images (train_scale 1.5: whole head slices, zoomed-in views down to
                 skull-less brain, and soft-tissue/bone fields, in both classes); validation AUC 0.987,
                 sensitivity 0.927, specificity 0.967 at 0.5; ~185 s (120 s drawing images)
  ptx_cr_demo    validation AUC 1.000, sensitivity 0.977, specificity 1.000 at 0.5; ~115-125 s (75-85 s drawing)
  mr_brain_demo  4500 training images (train_scale 1.5: T1/T2/FLAIR, any zoom, bright look-alikes in
                 both classes make it the harder task); validation AUC 0.997, sensitivity 0.973,
                 specificity 0.987 at 0.5; ~120-170 s (60-80 s drawing)

On real files (tests/test_demo_models.py): pydicom-data's head CT 693_UNCR scores ~0.007
untouched and 0.999-1.0 with a painted haemorrhage (6 seeds); pydicom's CT_small (an 85 mm,
skull-less crop of a vertebra and muscle) ~0.04. The head-CT model's first version, trained on
whole synthetic head slices only (AUC 0.999 on them), called CT_small a haemorrhage (1.0): dense
bone in a small field of view looked like the blob until zoomed views and skull-less fields with
bone fragments were put in both classes. The chest CR RG1_UNCR ~0.01 untouched and
0.78-1.0 with a painted pneumothorax (12 paint seeds tried); pydicom's MR_small (uncompressed,
JPEG 2000 and JPEG-LS lossless alike) ~0.07 untouched and 0.999-1.0 with a painted lesion
(12 seeds). The MR model's first drafts called MR_small itself positive (0.95-0.999): bright
anatomy in a dark field looked like a lesion until the synthetic lesion was made the brightest
thing in its slice and bright look-alikes (fat, globes, arcs, clutter) were put in both classes.

Needs the ``train`` extra (torch); inference never imports this module.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from engines.demo import synthetic
from engines.preprocess import prepare_frame


@dataclass(frozen=True)
class DemoSpec:
    """What differs between the demo models: the finding, the modality and the card."""

    directory: str
    kind: str
    finding: str  # what the synthetic finding looks like, for the card's intended_use
    card: dict
    train_scale: float = 1.0  # this model trains on train_scale * --n-train images (a harder task)


_NOT_CLINICAL = (
    "Demonstration only: a tiny CNN trained on synthetic images drawn by engines/demo/synthetic.py "
    "(no patient data), to exercise radstream's AI pre-read end to end. NOT FOR CLINICAL USE; "
    "its scores mean nothing about real patients."
)


def _card(name: str, applicability: dict, preprocessing: dict, volume: dict, label: dict) -> dict:
    """A demo card; what all three share is written once (key order is the card file's)."""
    return {
        "name": name, "version": "1.0.0", "model_file": "model.onnx", "sha256": "", "intended_use": "",
        "clinical_use": False, "applicability": applicability,
        "input": {"name": "image", "shape": [1, 128, 128], "dtype": "float32", "max_batch": 64},
        "output": {"name": "logits", "activation": "sigmoid"},
        "preprocessing": preprocessing, "volume": volume, "labels": [label],
    }


def _prep(window: dict | None = None) -> dict:
    """Rescale, MONOCHROME1, the window if any (else min/max), 128x128, normalised."""
    return {"rescale": True, "invert_monochrome1": True, **({"window": window} if window else {}),
            "resize": [128, 128], "normalize": {"mean": 0.5, "std": 0.25}}


def _label(name: str, critical: bool, sct: tuple[str, str], radlex: tuple[str, str]) -> dict:
    return {"name": name, "threshold": 0.5, "critical": critical, "codes": [
        {"scheme": "SCT", "value": sct[0], "meaning": sct[1]},
        {"scheme": "RADLEX", "value": radlex[0], "meaning": radlex[1]}]}


_CT_SOP = ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"]
_CR_SOP = ["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"]
_MR_SOP = ["1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"]
_VOLUME = {"slice_selection": "central", "max_slices": 24, "aggregate": "max", "top_k": 3}

ICH = DemoSpec("ich_ct_demo", "hemorrhage", (
    "a hyperdense (55-85 HU), irregular blob 5-20 mm in radius, with or without a hypodense rim, in the "
    "parenchyma of crude synthetic axial head-CT slices, of zoomed-in views of them (45-200 mm across, down "
    "to brain with no skull in sight, resampled to 64-256 pixels) and of skull-less soft-tissue fields with "
    "bone fragments; both classes include all three"), _card(
    "radstream-demo-ich-ct",
    {"modalities": ["CT"], "body_parts": ["HEAD", "BRAIN", "SKULL"], "sop_classes": _CT_SOP, "min_slices": 1,
     "max_slices": 2000},
    _prep({"center": 40, "width": 80}), _VOLUME,
    _label("hemorrhage", True, ("50960005", "Hemorrhage"), ("RID4700", "hemorrhage"))), train_scale=1.5)

PTX = DemoSpec("ptx_cr_demo", "pneumothorax", (
    "an apical/lateral lucent rim without lung markings bounded by a thin bright pleural line, in crude "
    "synthetic frontal chest radiographs"), _card(
    "radstream-demo-ptx-cr",
    {"modalities": ["CR", "DX"], "body_parts": ["CHEST", "THORAX"], "sop_classes": _CR_SOP, "min_slices": 1,
     "max_slices": 10},
    _prep(), {"slice_selection": "all", "max_slices": 10, "aggregate": "max", "top_k": 1},
    _label("pneumothorax", True, ("36118008", "Pneumothorax"), ("RID5352", "pneumothorax"))))

LESION_MR = DemoSpec("mr_brain_demo", "lesion", (
    "a round-ish, soft-edged focal spot 6-17% of the field of view across, in parenchyma, 5-30% brighter "
    "than anything else in the slice (and at least 1.5 times the tissue), in crude synthetic T1-, T2- and "
    "FLAIR-like brain-MR slices of any zoom, scale and bias field, min/max scaled per image"), _card(
    "radstream-demo-lesion-mr",
    # no body_parts: BodyPartExamined is Type 3 and pydicom's MR_small.dcm has none
    {"modalities": ["MR"], "body_parts": [], "sop_classes": _MR_SOP, "min_slices": 1, "max_slices": 2000},
    _prep(), _VOLUME,  # no window: MR has no absolute units, so per-image min/max scaling
    _label("lesion", False, ("52988006", "Lesion"), ("RID38780", "lesion"))), train_scale=1.5)

SPECS = (ICH, PTX, LESION_MR)


def _preprocessing(card: dict) -> SimpleNamespace:
    """The card's preprocessing section as the attribute object `prepare_frame` reads."""
    section = card["preprocessing"]
    window = section.get("window")
    normalize = section.get("normalize")
    return SimpleNamespace(
        window=SimpleNamespace(**window) if window else None,
        resize=tuple(section["resize"]),
        normalize=SimpleNamespace(**normalize) if normalize else None,
    )


def make_dataset(spec: DemoSpec, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` synthetic images through the production preprocessing, and their labels."""
    prep = _preprocessing(spec.card)
    images, labels = [], []
    for raw, attrs, label in synthetic.samples(spec.kind, count, seed):
        images.append(prepare_frame(raw, prep, slope=attrs["slope"], intercept=attrs["intercept"],
                                    monochrome1=attrs["monochrome1"]))
        labels.append(label)
    return np.stack(images).astype(np.float32), np.asarray(labels, np.float32)


def build_network(torch_nn):
    """Five strided 3x3/5x5 convolutions with batch norm, global max pool, one linear layer."""
    nn = torch_nn
    widths = [(1, 8, 5, 2), (8, 16, 3, 2), (16, 32, 3, 2), (32, 32, 3, 1), (32, 48, 3, 2)]
    layers = []
    for cin, cout, k, stride in widths:
        layers += [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(48, 1))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    positives = labels == 1
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def to_onnx(network, card: dict) -> onnx.ModelProto:
    """The trained network as an opset-17 graph: Conv(+folded BN)/Relu x5, GlobalMaxPool, Gemm."""
    modules = list(network)
    channels, height, width = card["input"]["shape"]
    nodes, inits = [], []
    current = card["input"]["name"]
    index = 0
    for i in range(0, 15, 3):
        conv, bn = modules[i], modules[i + 1]
        w = conv.weight.detach().numpy().astype(np.float64)
        scale = bn.weight.detach().numpy() / np.sqrt(bn.running_var.numpy() + bn.eps)
        bias = bn.bias.detach().numpy() - bn.running_mean.numpy() * scale
        w = w * scale[:, None, None, None]
        inits += [numpy_helper.from_array(w.astype(np.float32), f"conv{index}.weight"),
                  numpy_helper.from_array(bias.astype(np.float32), f"conv{index}.bias")]
        k, stride = conv.kernel_size[0], conv.stride[0]
        nodes.append(helper.make_node("Conv", [current, f"conv{index}.weight", f"conv{index}.bias"],
                                      [f"conv{index}"], kernel_shape=[k, k], strides=[stride, stride],
                                      pads=[k // 2] * 4))
        nodes.append(helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"]))
        current = f"relu{index}"
        index += 1
    linear = modules[-1]
    inits += [numpy_helper.from_array(linear.weight.detach().numpy().astype(np.float32), "fc.weight"),
              numpy_helper.from_array(linear.bias.detach().numpy().astype(np.float32), "fc.bias")]
    nodes += [helper.make_node("GlobalMaxPool", [current], ["pooled"]),
              helper.make_node("Flatten", ["pooled"], ["features"], axis=1),
              helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], [card["output"]["name"]], transB=1)]
    graph = helper.make_graph(
        nodes, card["name"].replace("-", "_"),
        [helper.make_tensor_value_info(card["input"]["name"], TensorProto.FLOAT, ["batch", channels, height, width])],
        [helper.make_tensor_value_info(card["output"]["name"], TensorProto.FLOAT, ["batch", len(card["labels"])])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="radstream-demo-train")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def train_one(spec: DemoSpec, out: Path, seed: int, *, n_train: int, n_val: int, epochs: int) -> dict:
    """Train, validate, export and write the card of one demo model; returns its figures."""
    import torch

    started = time.monotonic()
    torch.manual_seed(seed)
    x_train, y_train = make_dataset(spec, n_train, seed * 1000 + 1)
    x_val, y_val = make_dataset(spec, n_val, seed * 1000 + 2)
    generated = time.monotonic() - started
    network = build_network(torch.nn)
    optimiser = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = int(np.ceil(n_train / 32))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, 3e-3, total_steps=epochs * steps_per_epoch)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order_rng = np.random.default_rng(seed)
    images, targets = torch.from_numpy(x_train), torch.from_numpy(y_train)[:, None]
    for epoch in range(epochs):
        network.train()
        total = 0.0
        for step in range(steps_per_epoch):
            pick = torch.from_numpy(order_rng.choice(n_train, 32, replace=False))
            batch = images[pick]
            flip = torch.from_numpy(order_rng.random(32) < 0.5)
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            # mild contrast/brightness jitter (in normalised units) so the model does not
            # key on one exact grey level of the synthetic anatomy
            gain = torch.from_numpy(order_rng.uniform(0.9, 1.1, (32, 1, 1, 1)).astype(np.float32))
            shift = torch.from_numpy(order_rng.normal(0, 0.1, (32, 1, 1, 1)).astype(np.float32))
            loss = loss_fn(network(batch * gain + shift), targets[pick])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += loss.item()
        print(f"{spec.directory}: epoch {epoch + 1}/{epochs} loss {total / steps_per_epoch:.4f}", flush=True)
    network.eval()
    with torch.no_grad():
        val_scores = torch.sigmoid(network(torch.from_numpy(x_val))).numpy()[:, 0]
    threshold = spec.card["labels"][0]["threshold"]
    figures = {
        "auc": roc_auc(val_scores, y_val),
        "sensitivity": float((val_scores[y_val == 1] >= threshold).mean()),
        "specificity": float((val_scores[y_val == 0] < threshold).mean()),
        "threshold": threshold,
        "n_train": n_train,
        "n_val": n_val,
        "epochs": epochs,
        "parameters": sum(p.numel() for p in network.parameters()),
        "seconds": round(time.monotonic() - started, 1),
        "seconds_generating": round(generated, 1),
    }
    directory = out / spec.directory
    directory.mkdir(parents=True, exist_ok=True)
    model_path = directory / "model.onnx"
    model = to_onnx(network, spec.card)
    model_path.write_bytes(model.SerializeToString())
    _check_export(model_path, network, x_val[:8], spec.card)
    card = dict(spec.card)
    card["sha256"] = hashlib.sha256(model_path.read_bytes()).hexdigest()
    card["intended_use"] = (
        f"{_NOT_CLINICAL} Scores one synthetic {spec.kind}-like finding: {spec.finding}. Training (python -m engines.demo.train "
        f"--seed {seed}): {n_train} synthetic images, {epochs} epochs, {figures['parameters']} parameters, "
        f"{figures['seconds']:.0f} s on one CPU thread; validation on {n_val} held-out synthetic images: "
        f"AUC {figures['auc']:.3f}, sensitivity {figures['sensitivity']:.3f} and specificity "
        f"{figures['specificity']:.3f} at threshold {threshold}."
    )
    (directory / "card.yaml").write_text(
        "# Written by python -m engines.demo.train; edit the DemoSpec there, not this file.\n"
        + yaml.safe_dump(card, sort_keys=False, width=100, allow_unicode=True, default_flow_style=None))
    print(f"{spec.directory}: {figures}", flush=True)
    return figures


def _check_export(path: Path, network, sample: np.ndarray, card: dict) -> None:
    """The ONNX graph must compute what the torch network computes."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([card["output"]["name"]], {card["input"]["name"]: sample})[0]
    with torch.no_grad():
        want = network(torch.from_numpy(sample)).numpy()
    if not np.allclose(got, want, atol=1e-3):
        raise RuntimeError(f"ONNX export differs from torch: max |diff| {np.abs(got - want).max()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="*", default=[s.directory for s in SPECS])
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-val", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    for spec in SPECS:
        if spec.directory in args.models:
            train_one(spec, args.out, args.seed, n_train=int(round(args.n_train * spec.train_scale)),
                      n_val=args.n_val, epochs=args.epochs)


if __name__ == "__main__":
    main()
