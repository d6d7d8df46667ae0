"""Property-based fuzzing of the gateways on mutations of real input.

The properties live in :mod:`load.fuzz_gateways` (``python -m load.fuzz_gateways
--seconds N`` runs them longer): the DICOM intake with its completeness walk, whole
DICOM associations over TCP to the SCP, the STOW-RS multipart reader over real HTTP, the
MLLP framer and the HL7 parser. Each runs
a few hundred mutations here; the counts are reported at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from load.fuzz_gateways import MUTATIONS, properties, run_property

# Mutated values are invalid on purpose; pydicom warns about each one it reads.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

#: Mutations per property in the test suite: a few seconds each on two cores.
EXAMPLES = {"dicom-intake": 500, "dicom-association": 60, "stow-multipart": 150, "mllp-framer": 400,
            "hl7-parser": 400}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    with properties(Path(tmp_path_factory.mktemp("fuzz"))) as props:
        yield {prop.name: prop for prop in props}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_no_mutation_of_real_input_is_accepted_unless_stored_intact_nor_crashes_nor_hangs(
        fuzzed: dict[str, object], name: str) -> None:
    before = MUTATIONS[name]
    run_property(fuzzed[name], EXAMPLES[name])
    assert MUTATIONS[name] - before >= EXAMPLES[name] // 2  # hypothesis may stop early on few distinct inputs


# The gateway reads plain values (UIDs, codes, dates, IS and US numbers) from their raw
# bytes; anything else goes through pydicom. Both ways must give the same answer.
_HEADER_VRS = {"StudyInstanceUID": "UI", "Modality": "CS", "StudyDate": "DA", "StudyTime": "TM",
               "Rows": "US", "SeriesNumber": "IS", "PatientSex": "CS", "SeriesInstanceUID": "UI"}


def _one_element(keyword: str, value: bytes, implicit: bool, little: bool):
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset

    tag = tag_for_keyword(keyword)
    dataset = Dataset()
    dataset[tag] = RawDataElement(tag, None if implicit else _HEADER_VRS[keyword], len(value), value, 0, implicit,
                                  little)
    return dataset


def test_header_values_read_from_raw_bytes_are_what_pydicom_reads() -> None:
    from hypothesis import given, settings, strategies as st

    from gateways.validation import header_int, header_text, pydicom_int, pydicom_text

    values = st.binary(max_size=24) | st.text(alphabet=" \\\0\t0123456789.ABCZabc-+:", max_size=24).map(str.encode)

    @settings(max_examples=1500, deadline=None, database=None)
    @given(st.sampled_from(sorted(_HEADER_VRS)), values, st.booleans(), st.booleans())
    def same(keyword: str, value: bytes, implicit: bool, little: bool) -> None:
        fast, slow = (header_int, pydicom_int) if _HEADER_VRS[keyword] in ("US", "IS") else (header_text, pydicom_text)
        assert fast(_one_element(keyword, value, implicit, little), keyword) == \
            slow(_one_element(keyword, value, implicit, little), keyword)

    same()
