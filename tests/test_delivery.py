"""Results delivery: the destinations file, retries with backoff, dead letters, the breaker, commits."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters.result_senders import DeliveryError
from engines.breaker import CircuitBreaker
from schemas.events import DeliveryStatus, ResultStatus, StudyResult, Priority
from schemas.settings import ResultsSettings
from streams.delivery import (
    Destination,
    DestinationsError,
    OffsetTracker,
    Ports,
    backoff_s,
    deliver,
    delivery_key,
    load_destinations,
)

DESTINATIONS = """
[destinations.pacs]
kind = "sr"
sites = ["SITE_A"]
host = "pacs.example.org"
port = 11112
called_ae = "PACS"

[destinations.ris]
kind = "oru"
host = "ris.example.org"
port = 2575
receiving_facility = "HOSP"

[destinations.platform]
kind = "webhook"
url = "https://hooks.example.org/radstream"
secret_env = "HOOK_SECRET"
"""


def result(revision: int = 1) -> StudyResult:
    return StudyResult(trace_id="trace-1", study_uid="1.2.3", version=1, revision=revision,
                       status=ResultStatus.PRELIMINARY, issued_at=datetime(2026, 1, 1, tzinfo=UTC), source_site="SITE_A",
                       modalities=["CT"], priority=Priority.ROUTINE, critical=False, findings=[], instances=[],
                       report_text="draft", changes=["first AI result"])


def test_a_destinations_file_is_read_with_its_sites_and_secrets(tmp_path: Path) -> None:
    path = tmp_path / "destinations.toml"
    path.write_text(DESTINATIONS)
    destinations = load_destinations(path, environ={"HOOK_SECRET": "s3cret"})
    assert {name: d.kind for name, d in destinations.items()} == {"pacs": "sr", "ris": "oru", "platform": "webhook"}
    assert destinations["pacs"].serves("SITE_A") and not destinations["pacs"].serves("SITE_B")
    assert destinations["ris"].serves("SITE_B")  # no sites: every site
    assert destinations["platform"].secret == b"s3cret"


@pytest.mark.parametrize("text, error", [
    ('[destinations.x]\nkind = "fax"', r"destinations\.x\.kind must be one of sr, oru, fhir, webhook"),
    ('[destinations.x]\nkind = "sr"\nhost = "h"\nport = 104', r"destinations\.x\.called_ae is required"),
    ('[destinations.x]\nkind = "fhir"\nurl = "u"\nhots = "typo"', r"destinations\.x: unknown key 'hots'"),
    ('[destinations.x]\nkind = "webhook"\nurl = "u"', r"destinations\.x\.secret \(or secret_env\) is required"),
    ('[destinations.x]\nkind = "webhook"\nurl = "u"\nsecret_env = "NOPE"', r"variable NOPE is not set"),
    ('[destinations.x]\nkind = "oru"\nhost = "h"\nport = 70000', r"destinations\.x\.port must be a port number"),
    ('[destinations.x]\nkind = "fhir"\nurl = "u"\nsites = []', r"destinations\.x\.sites must be a non-empty list"),
    ("[other]\n", "no \\[destinations.NAME\\] table"),
    ("not = toml = at all", "is not valid TOML"),
])
def test_a_wrong_destination_is_refused_naming_the_file_and_key(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "d.toml"
    path.write_text(text)
    with pytest.raises(DestinationsError, match=error) as caught:
        load_destinations(path, environ={})
    assert str(path) in str(caught.value)


class Harness:
    """Ports with a fake clock: sleeping advances it, so backoffs and the breaker run instantly."""

    def __init__(self, outcomes: list) -> None:
        self.outcomes, self.states, self.letters, self.sleeps = list(outcomes), [], [], []
        self.clock = 1000.0
        self.sent = 0

    def send(self, dest, result) -> str:
        self.sent += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock += seconds

    def ports(self) -> Ports:
        return Ports(send=self.send, publish=self.states.append, dead_letter=self.letters.append, sleep=self.sleep,
                     now=lambda: datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.clock),
                     rng=random.Random(7))

    def breaker(self, failures: int = 100, reset_s: float = 30.0) -> CircuitBreaker:
        return CircuitBreaker("delivery:test", failures, reset_s, clock=lambda: self.clock)


HOOK = Destination(name="hook", kind="webhook", url="http://127.0.0.1:9/", secret=b"k")


def test_a_failing_output_is_retried_with_growing_jittered_backoff_until_acknowledged() -> None:
    settings = ResultsSettings(max_attempts=6, backoff_s=1.0, max_backoff_s=60)
    h = Harness([DeliveryError("503", retryable=True)] * 3 + ["doc-1"])
    final = deliver(result(), HOOK, h.breaker(), settings, h.ports())
    assert final.status is DeliveryStatus.ACKED and final.attempts == 4 and final.document_id == "doc-1"
    assert [s.status for s in h.states] == [DeliveryStatus.QUEUED] + [DeliveryStatus.FAILED] * 3 + [DeliveryStatus.ACKED]
    assert all(0 <= delay <= 2 ** i for i, delay in enumerate(h.sleeps))  # full jitter under 1, 2, 4 s
    assert len(set(h.sleeps)) == 3  # jittered, not lockstep
    assert all(s.next_attempt_at is not None for s in h.states if s.status is DeliveryStatus.FAILED)
    assert h.letters == []


def test_retries_run_out_into_a_dead_letter_holding_the_result() -> None:
    settings = ResultsSettings(max_attempts=3, backoff_s=0.5)
    h = Harness([DeliveryError("connection refused", retryable=True)] * 3)
    final = deliver(result(), HOOK, h.breaker(), settings, h.ports(), payload=b"encoded result")
    assert final.status is DeliveryStatus.DEAD and final.attempts == 3 and h.sent == 3
    (letter,) = h.letters
    assert letter.stage == "delivery" and letter.reason == "delivery-exhausted" and letter.payload == b"encoded result"
    assert letter.key == delivery_key(result(), "hook") == "trace-1:1:hook"
    assert "failed 3 times: connection refused" in letter.error


def test_a_refusal_is_not_retried() -> None:
    h = Harness([DeliveryError("400 bad request", retryable=False)])
    final = deliver(result(), HOOK, h.breaker(), ResultsSettings(), h.ports())
    assert final.status is DeliveryStatus.DEAD and final.attempts == 1 and h.letters[0].reason == "delivery-refused"


def test_retry_after_from_the_receiver_is_honoured() -> None:
    busy = DeliveryError("429", retryable=True)
    busy.retry_after_s = 20
    h = Harness([busy, "ok"])
    deliver(result(), HOOK, h.breaker(), ResultsSettings(backoff_s=0.1), h.ports())
    assert h.sleeps == [20]


def test_an_open_circuit_holds_the_destination_until_its_reset() -> None:
    settings = ResultsSettings(max_attempts=10, backoff_s=0.01, max_backoff_s=0.01)
    h = Harness([DeliveryError("down", retryable=True)] * 2 + ["ok"])
    breaker = h.breaker(failures=2, reset_s=30)
    start = h.clock
    final = deliver(result(), HOOK, breaker, settings, h.ports())
    assert final.status is DeliveryStatus.ACKED and final.attempts == 3
    assert h.clock - start >= 30  # the third attempt waited out the open circuit
    assert not breaker.open


def test_offsets_commit_only_past_outputs_all_settled() -> None:
    tracker = OffsetTracker()
    tracker.add(0, 10, 2)
    tracker.add(0, 11, 1)
    tracker.add(1, 5, 0)  # a result no destination serves: settled at once
    assert tracker.committable() == {1: 6}
    tracker.done(0, 11)
    assert tracker.committable() == {1: 6}  # 10 still open
    tracker.done(0, 10)
    assert tracker.committable() == {1: 6}
    tracker.done(0, 10)
    assert tracker.committable() == {0: 12, 1: 6}


def test_backoff_grows_to_its_cap() -> None:
    settings = ResultsSettings(backoff_s=1, max_backoff_s=5)
    rng = random.Random(1)
    assert all(backoff_s(attempt, settings, rng) <= 5 for attempt in range(1, 30))
