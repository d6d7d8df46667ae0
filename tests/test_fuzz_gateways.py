"""Property-based fuzzing of the four gateway parsers on mutations of real input.

The properties live in :mod:`load.fuzz_gateways` (``python -m load.fuzz_gateways
--seconds N`` runs them longer): the DICOM intake with its completeness walk, the
STOW-RS multipart reader over real HTTP, the MLLP framer and the HL7 parser. Each runs
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
EXAMPLES = {"dicom-intake": 500, "stow-multipart": 150, "mllp-framer": 400, "hl7-parser": 400}


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
