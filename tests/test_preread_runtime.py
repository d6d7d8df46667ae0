"""The worklist never waits for AI, and AI that fails is shown, not hidden: whole runtime.

``radstream up`` runs for real with a failure forced for real: a latency budget nobody can
meet, or a model whose ONNX graph fails when ONNX Runtime runs it. A head CT sent by
dcmtk's ``storescu`` must still get its routed worklist row, with the rule-based
priority unchanged and ``ai_status`` saying what happened and why.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from schemas.settings import Settings
from tests.test_end_to_end import STORESCU, real_file, start_up, stop_up, storescu, wait_for_worklist
from tests.test_preread import _failing_model

pytestmark = pytest.mark.integration


@pytest.mark.skipif(not shutil.which(STORESCU), reason="dcmtk is installed by scripts/bootstrap.sh")
@pytest.mark.parametrize("failure", ["timeout", "engine_error"])
def test_a_failed_pre_read_still_leaves_a_routed_row_with_its_ai_status(settings: Settings, tmp_path: Path,
                                                                         failure: str) -> None:
    extra = ({"RADSTREAM_AI_LATENCY_BUDGET_S": "0.001"} if failure == "timeout"
             else {"RADSTREAM_AI_MODELS_DIR": str(_failing_model(tmp_path))})
    proc = start_up(settings, tmp_path, **extra)
    try:
        sent = storescu(settings, [real_file("693_UNCR.dcm")])
        assert sent.returncode == 0, sent.stderr
        (row,) = wait_for_worklist(settings, 1, ai=True)
    finally:
        stop_up(proc)
    assert row["priority"] == "ROUTINE" and row["ai_findings"] == []
    if failure == "timeout":
        assert row["ai_status"] == "TIMEOUT" and "latency budget" in row["ai_reason"], row
    else:
        assert row["ai_status"] == "ERROR" and "engine error" in row["ai_reason"], row
