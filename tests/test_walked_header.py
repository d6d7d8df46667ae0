"""The C-STORE header read from the completeness walk reads as pydicom's own ``dcmread``.

The gateway no longer parses a received data set twice: the walk that checks every
declared length (:func:`gateways.validation.check_encoding`) keeps where each top-level
element lies, and :func:`gateways.validation.walked_header` makes the header from that.
Every header value the intake reads (UIDs, metadata, the pixel module) must come out as
``dcmread(..., stop_before_pixels=True)`` gives it, so these tests compare the two element
by element: over pydicom's whole test corpus (implicit, explicit, big endian and deflated
syntaxes, character sets, sequences of defined and undefined length), and over damaged
copies of real files.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files
from pydicom.dataset import Dataset

from gateways.dicom_wire import data_set_offset
from gateways.validation import InvalidInstance, check_encoding, walked_header


def _corpus() -> list[Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom-data's download attempts, offline
        names = get_testdata_files("**/*") + get_charset_files("*")
    return sorted(Path(name) for name in names if Path(name).is_file())


def _file(name: str) -> bytes:
    return Path(get_testdata_file(name, download=False) or get_charset_files(name)[0]).read_bytes()


def _value(dataset: Dataset, tag) -> tuple[str, object]:
    """An element's VR and value as read, or the name of the error reading it raised."""
    try:
        element = dataset[tag]
    except Exception as exc:  # a value pydicom cannot convert: the same error either way
        return "error", type(exc).__name__
    return element.VR, element.value


def _same(one: tuple[str, object], other: tuple[str, object]) -> bool:
    """Whether two read elements agree; a nested value that cannot be converted (inside a
    sequence) must fail to print the same way on both sides."""
    try:
        return one == other
    except Exception:
        return _printed(one) == _printed(other)


def _printed(value: object) -> str:
    try:
        return str(value)
    except Exception as exc:
        return type(exc).__name__


def _differences(data: bytes) -> list | None:
    """How the walked header differs from dcmread's ([] when it does not); None where the
    walk refuses the data set, or leaves it to dcmread (walked_header returns None)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            expected = dcmread(BytesIO(data), stop_before_pixels=True)
            transfer_syntax = str(expected.file_meta.TransferSyntaxUID)
        except Exception:
            return None
        try:
            walked = walked_header(check_encoding(data, transfer_syntax, header=True))
        except InvalidInstance:
            return None
        if walked is None:
            return None
        differences: list = [("tags", sorted(set(expected.keys()) ^ set(walked.keys())))]
        if not differences[0][1]:
            differences = []
        for tag in expected.keys():
            if tag in walked and not _same(_value(expected, tag), _value(walked, tag)):
                differences.append((tag, _value(expected, tag), _value(walked, tag)))
        for keyword in ("PatientName", "StudyInstanceUID", "Rows", "BitsAllocated"):
            if not _same(_value(expected, keyword), _value(walked, keyword)):
                differences.append((keyword, _value(expected, keyword), _value(walked, keyword)))
    return differences


def test_every_corpus_file_the_walk_accepts_has_the_header_dcmread_reads() -> None:
    compared, differing = 0, {}
    for path in _corpus():
        differences = _differences(path.read_bytes())
        if differences is None:
            continue
        compared += 1
        if differences:
            differing[path.name] = differences[:3]
    assert differing == {}
    # not vacuous: pydicom's corpus and character set files are ~250, nearly all of them whole
    assert compared >= 150


@pytest.mark.parametrize("name", ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm",
                                  "chrH31.dcm", "rtplan.dcm", "693_UNCR.dcm"])
def test_each_syntax_and_character_set_is_read_from_the_walk_not_left_to_dcmread(name: str) -> None:
    data = _file(name)
    expected = dcmread(BytesIO(data), stop_before_pixels=True)
    walked = walked_header(check_encoding(data, str(expected.file_meta.TransferSyntaxUID), header=True))
    assert walked is not None
    assert _differences(data) == []
    assert walked.original_encoding == expected.original_encoding
    assert walked.original_character_set == expected.original_character_set


_ORIGINALS = {name: _file(name) for name in ("CT_small.dcm", "rtplan.dcm", "MR_small_implicit.dcm")}


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_ORIGINALS)), st.integers(min_value=0, max_value=4000), st.binary(min_size=1, max_size=8))
def test_a_damaged_data_set_the_walk_accepts_reads_as_dcmread_reads_it(name: str, at: int, noise: bytes) -> None:
    """Overwrite a few bytes of a real data set (after its file meta, which a C-STORE's
    gateway writes itself): whatever the walk still accepts, the header made from it holds
    what dcmread reads, or the walk leaves it to dcmread."""
    original = _ORIGINALS[name]
    at += data_set_offset(original)
    damaged = original[:at] + noise + original[at + len(noise):]
    assert _differences(damaged) in (None, [])
