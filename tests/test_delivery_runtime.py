"""Nothing lost when a receiver is down: the delivery worker on a real broker, a real
webhook receiver that verifies signatures, and ``radstream results replay-dead``."""

from __future__ import annotations

import json
import threading
import time

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from adapters.kafka import producer_config
from adapters.result_documents import verify_webhook
from radstream import procs
from radstream.cli import cli
from schemas.codec import Codec
from schemas.events import DeadLetter, DeliveryStatus, Priority, ResultDelivery, ResultStatus, StudyResult, utcnow
from schemas.settings import Settings
from schemas.topics import DEAD_LETTER, RESULTS_DELIVERY, RESULTS_OUTBOX, key_of
from streams.delivery import Delivery, load_destinations, read_topic

pytestmark = pytest.mark.integration
SECRET = "hook-secret-for-tests"

class Receiver:
    """A webhook receiver as a platform runs one: it checks the signature before it counts a delivery."""

    def __init__(self, port: int) -> None:
        self.received: list[dict] = []
        self.bad_signatures = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not verify_webhook(SECRET.encode(), body, self.headers["X-Radstream-Signature"], now=int(time.time())):
                    outer.bad_signatures += 1
                    self.send_response(401)
                else:
                    outer.received.append({"key": self.headers["Idempotency-Key"], "body": json.loads(body)})
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

def _wait(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")

def test_a_webhook_dead_lettered_while_its_receiver_was_down_is_delivered_exactly_once_on_replay(
        broker: Settings, tmp_path: Path) -> None:
    port = procs.free_port()
    destinations_file = tmp_path / "destinations.toml"
    destinations_file.write_text(f'[destinations.platform]\nkind = "webhook"\nurl = "http://127.0.0.1:{port}/hook"\n'
                                 f'secret = "{SECRET}"\n')
    settings = broker.model_copy(update={"results": broker.results.model_copy(update={
        "destinations_file": destinations_file, "max_attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.1,
        "timeout_s": 2.0})})
    result = StudyResult(trace_id="trace-down", study_uid="1.2.826.0.1.3680043.8.498.77", version=1, revision=1,
                         status=ResultStatus.PRELIMINARY, issued_at=utcnow(), source_site="SITE_A",
                         modalities=["CT"], priority=Priority.CRITICAL, critical=True, findings=[], instances=[],
                         report_text="draft", changes=["first AI result"])
    delivery = Delivery(settings, load_destinations(destinations_file))
    stop = threading.Event()
    worker = threading.Thread(target=delivery.run, args=(stop,), daemon=True)
    worker.start()
    try:
        producer = Producer(producer_config(settings))
        producer.produce(RESULTS_OUTBOX.name(settings), value=Codec().encode(result), key=key_of(RESULTS_OUTBOX, result))
        assert producer.flush(10) == 0
        # the receiver is down: the attempts run out and the output becomes a dead letter with the result in it
        letters = _wait(lambda: [d for d in read_topic(settings, DEAD_LETTER) if isinstance(d, DeadLetter)
                                 and d.stage == "delivery"], 60, "the dead letter")
        assert letters[0].key == "trace-down:1:platform" and Codec().decode(letters[0].payload) == result
        states = [s for s in read_topic(settings, RESULTS_DELIVERY) if isinstance(s, ResultDelivery)]
        assert [s.status for s in states] == [DeliveryStatus.QUEUED, DeliveryStatus.FAILED, DeliveryStatus.FAILED,
                                              DeliveryStatus.DEAD]
        assert states[-1].attempts == 3 and "refused" in (states[-1].error or "").lower()
    finally:
        stop.set()
        worker.join(10)

    receiver = Receiver(port)  # the receiver is back
    try:
        runner, env = CliRunner(), settings.to_env()
        first = runner.invoke(cli, ["results", "replay-dead"], env=env, catch_exceptions=False)
        assert first.exit_code == 0, first.output
        assert "delivered 1 skipped 0 failed 0" in first.output
        second = runner.invoke(cli, ["results", "replay-dead"], env=env, catch_exceptions=False)
        assert second.exit_code == 0, second.output
        assert "delivered 0 skipped 1 failed 0" in second.output
        assert len(receiver.received) == 1 and receiver.bad_signatures == 0
        body = receiver.received[0]["body"]
        assert json.dumps(body).count("trace-down") >= 1
        acked = [s for s in read_topic(settings, RESULTS_DELIVERY)
                 if isinstance(s, ResultDelivery) and s.status is DeliveryStatus.ACKED]
        assert len(acked) == 1 and acked[0].destination == "platform"
    finally:
        receiver.close()
