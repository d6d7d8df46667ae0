"""Model cards: the YAML beside each ONNX file that says what a model is for and how to feed it.

A card is validated when it is loaded, highdicom-style: pydantic models with ``extra="forbid"``
and strict scalar types, so a typo'd key, ``version: 1.0`` (a float) or ``clinical_use: "yes"``
fails at load time with a ``CardError`` naming the card file and the dotted key, never later as
a wrong score. The card also pins the model file by sha256: a model swapped under a card is
refused. Everything downstream (preprocess, batcher, engines, results) reads these attributes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr,
                      ValidationError, ValidationInfo, field_validator, model_validator)

PositiveInt = Annotated[StrictInt, Field(gt=0)]
PositiveFloat = Annotated[StrictFloat | StrictInt, Field(gt=0)]
Probability = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]


def _sized(value: object, size: int, names: str) -> object:
    if not isinstance(value, list | tuple) or len(value) != size:
        raise ValueError(f"must be {size} positive integers {names}, got {value!r}")
    return value


class CardError(ValueError):
    """A card that cannot be used; the message is ``<card file>: <dotted.key>: <what is wrong>``."""


class _Part(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Code(_Part):
    """A coded concept (e.g. SNOMED CT ``SCT``/``50960005``); values are strings so leading zeros survive."""

    scheme: StrictStr
    value: StrictStr
    meaning: StrictStr


class Label(_Part):
    name: Annotated[StrictStr, Field(min_length=1)]
    threshold: Probability
    critical: StrictBool = False
    codes: Annotated[tuple[Code, ...], Field(min_length=1)]


class Applicability(_Part):
    modalities: Annotated[tuple[Annotated[StrictStr, Field(pattern=r"^[A-Z0-9]{2,16}$")], ...], Field(min_length=1)]
    body_parts: tuple[StrictStr, ...] = ()
    sop_classes: tuple[Annotated[StrictStr, Field(pattern=r"^[0-9.]+$")], ...] = ()
    min_slices: PositiveInt = 1
    max_slices: PositiveInt | None = None
    #: [min, max] of an image's field of view (rows x PixelSpacing) the model was made for,
    #: e.g. a whole head, not a small-FOV reconstruction; checked per image when decoded
    field_of_view_mm: tuple[PositiveFloat, PositiveFloat] | None = None

    @field_validator("body_parts")
    @classmethod
    def _upper(cls, parts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(part.upper() for part in parts)

    @model_validator(mode="after")
    def _range(self) -> Applicability:
        if self.field_of_view_mm is not None and self.field_of_view_mm[1] < self.field_of_view_mm[0]:
            raise ValueError(f"field_of_view_mm {list(self.field_of_view_mm)} is [min, max] with min <= max")
        if self.max_slices is not None and self.max_slices < self.min_slices:
            raise ValueError(f"max_slices: {self.max_slices} is below min_slices {self.min_slices}")
        return self


class TensorIn(_Part):
    name: StrictStr
    shape: tuple[PositiveInt, PositiveInt, PositiveInt]
    dtype: Literal["float32", "float16"] = "float32"
    max_batch: Annotated[StrictInt, Field(ge=1, le=4096)] = 64

    @field_validator("shape", mode="before")
    @classmethod
    def _three(cls, value: object) -> object:
        return _sized(value, 3, "[C, H, W]")


class TensorOut(_Part):
    name: StrictStr
    activation: Literal["sigmoid", "softmax", "none"]


class Window(_Part):
    center: StrictFloat
    width: Annotated[StrictFloat, Field(gt=0)]


class Normalize(_Part):
    mean: StrictFloat
    std: Annotated[StrictFloat, Field(gt=0)]


class Preprocessing(_Part):
    rescale: StrictBool = True
    invert_monochrome1: StrictBool = True
    window: Window | None = None
    resize: tuple[PositiveInt, PositiveInt]
    normalize: Normalize | None = None

    @field_validator("resize", mode="before")
    @classmethod
    def _two(cls, value: object) -> object:
        return _sized(value, 2, "[H, W]")


class Volume(_Part):
    slice_selection: Literal["all", "central", "uniform"] = "all"
    max_slices: PositiveInt | None = None
    aggregate: Literal["max", "mean", "top_k_mean"] = "max"
    top_k: PositiveInt | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Volume:
        if self.slice_selection != "all" and self.max_slices is None:
            raise ValueError(f"max_slices: required when slice_selection is {self.slice_selection!r}")
        if self.aggregate == "top_k_mean" and self.top_k is None:
            raise ValueError("top_k: required when aggregate is 'top_k_mean'")
        return self


class ModelCard(_Part):
    """One validated card; ``model_file`` is absolute and its sha256 has been checked by ``load_card``."""

    name: Annotated[StrictStr, Field(pattern=r"^[a-z0-9-]+$")]
    version: StrictStr
    model_file: Path
    sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    intended_use: Annotated[StrictStr, Field(min_length=1)]
    clinical_use: StrictBool
    applicability: Applicability
    input: TensorIn
    output: TensorOut
    preprocessing: Preprocessing
    volume: Volume = Volume()
    labels: Annotated[tuple[Label, ...], Field(min_length=1)]
    _path: Path = PrivateAttr()

    @field_validator("model_file", mode="before")
    @classmethod
    def _beside_card(cls, value: object, info: ValidationInfo) -> object:
        # Relative to the card's directory, so a models folder can move as a whole.
        if not isinstance(value, str) or not value:
            raise ValueError("must be a file name relative to the card")
        directory = (info.context or {}).get("directory", Path.cwd())
        return (Path(directory) / value).resolve()

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelCard:
        if self.preprocessing.resize != self.input.shape[1:]:
            raise ValueError(f"preprocessing.resize: {list(self.preprocessing.resize)} must equal "
                             f"input.shape[1:] {list(self.input.shape[1:])}")
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"labels: duplicate label names {names}")
        if self.output.activation == "softmax" and len(self.labels) < 2:
            raise ValueError("output.activation: softmax needs at least two labels")
        return self

    @property
    def path(self) -> Path:
        """The card file this was loaded from."""
        return self._path

    @property
    def model_id(self) -> str:
        return self.name

    @property
    def not_for_clinical_use(self) -> bool:
        return not self.clinical_use

    def applies_to(self, modalities: Iterable[str] | str, body_parts: Iterable[str] | str = (),
                   sop_classes: Iterable[str] | str = (), n_images: int = 1) -> str | None:
        """None when this model may read the study, else the reason it may not.

        A study that states no body part is not excluded by ``body_parts``: BodyPartExamined
        (0018,0015) is Type 3 and often absent (pydicom-data's head CT has none).
        """
        rule = self.applicability
        seen = _upper_set(modalities)
        if not seen & set(rule.modalities):
            return f"modality {'/'.join(sorted(seen)) or 'none'} not in [{', '.join(rule.modalities)}]"
        parts = _upper_set(body_parts)
        if rule.body_parts and parts and not parts & set(rule.body_parts):
            return f"body part {'/'.join(sorted(parts))} not in [{', '.join(rule.body_parts)}]"
        sops = _upper_set(sop_classes)
        if rule.sop_classes and sops and not sops & set(rule.sop_classes):
            return f"SOP class {'/'.join(sorted(sops))} not in [{', '.join(rule.sop_classes)}]"
        if n_images < rule.min_slices:
            return f"{n_images} images < min_slices {rule.min_slices}"
        if rule.max_slices is not None and n_images > rule.max_slices:
            return f"{n_images} images > max_slices {rule.max_slices}"
        return None

    def scores(self, raw: np.ndarray) -> np.ndarray:
        """The output activation applied to raw model output: (N, n_labels) float32 in [0, 1]."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != len(self.labels):
            raise ValueError(f"{self.name}: output shape {raw.shape}, expected (N, {len(self.labels)})")
        if self.output.activation == "sigmoid":
            out = np.exp(-np.logaddexp(0.0, -raw))  # 1/(1+e^-x) without overflow
        elif self.output.activation == "softmax":
            shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
            out = shifted / shifted.sum(axis=1, keepdims=True)
        else:
            out = np.clip(raw, 0.0, 1.0)
        return out.astype(np.float32)


def _upper_set(values: Iterable[str] | str) -> set[str]:
    """A study's values (one string or many; None/empty dropped), stripped and upper-cased to compare."""
    values = (values,) if isinstance(values, str) else values
    return {str(value).strip().upper() for value in values if value}


def _dotted(loc: tuple[int | str, ...]) -> str:
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def _explain(path: Path, exc: ValidationError) -> str:
    """One line per error: ``<file>: <dotted.key>: <message>``.

    Cross-field checks raise ``ValueError("key: message")`` from a model validator whose own
    location is the enclosing object, so their key is appended to it.
    """
    lines = []
    for err in exc.errors(include_url=False):
        key, message = _dotted(err["loc"]), err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
            if found := re.match(r"([a-z_][a-z0-9_.\[\]]*): (.*)", message, re.S):
                key = f"{key}.{found[1]}" if key else found[1]
                message = found[2]
        lines.append(f"{path}: {key or '(card)'}: {message}")
    return "\n".join(lines)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(path: str | Path) -> ModelCard:
    """Read, validate and hash-check one card; every problem is a ``CardError``."""
    path = Path(path).resolve()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CardError(f"{path}: (card): cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise CardError(f"{path}: (card): must be a mapping of keys, got {type(raw).__name__}")
    try:
        card = ModelCard.model_validate(raw, context={"directory": path.parent})
    except ValidationError as exc:
        raise CardError(_explain(path, exc)) from None
    card._path = path
    if not card.model_file.is_file():
        raise CardError(f"{path}: model_file: {card.model_file} not found")
    actual = file_sha256(card.model_file)
    if actual != card.sha256:
        raise CardError(f"{path}: sha256: {card.model_file.name} hashes to {actual}, the card says {card.sha256}")
    return card


def load_cards(directory: str | Path) -> list[ModelCard]:
    """Every ``*/card.yaml`` under ``directory``, sorted by name; two cards may not share a name."""
    cards = [load_card(path) for path in sorted(Path(directory).glob("*/card.yaml"))]
    by_name: dict[str, ModelCard] = {}
    for card in cards:
        if card.name in by_name:
            raise CardError(f"{card.path}: name: {card.name!r} is also the name of {by_name[card.name].path}")
        by_name[card.name] = card
    return sorted(cards, key=lambda card: card.name)


def default_models_dir() -> Path:
    """The demo models shipped inside the package (engines/models)."""
    return Path(__file__).resolve().parent / "models"
