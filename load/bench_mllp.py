"""Benchmark: the radstream HL7 gateway against the ``hl7`` package's asyncio MLLP echo server.

Both receive the same N ORM^O01 STAT orders over MLLP in the same run, from the same
asyncio client: each connection sends one message and waits for its ACK before the
next (HL7 v2.5 C.4.3), over 1 and over several connections. The peer parses each
message with ``hl7`` and answers ``create_ack()`` (AA) — no Kafka. The radstream gateway
(``python -m gateways.hl7_mllp``, a separate process like the peer) also validates the
message, builds the ``OrderReceived`` event, publishes it to a real Tansu broker and
waits for the broker's ack before answering AA; the ratio is what that guarantee costs.
Every ACK must be AA and every accepted order must be on ``order.received``.

    python -m load.bench_mllp --messages 2000 [--connections 1 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from radstream import procs
from schemas.settings import Settings, load_settings
from schemas.topics import ORDER_RECEIVED
from adapters.kafka import ensure_topics

VT, FS_CR = b"\x0b", b"\x1c\r"


def orm(number: int) -> bytes:
    """One realistic ORM^O01: STAT head CT from the ED, accession ACC{number}."""
    accession = f"ACC{number:08d}"
    obr = ["OBR", "1", f"PL{number}", "", "CTHEAD^CT head without contrast^L"] + [""] * 11
    obr += ["DR1^Smith^Jane", "", accession] + [""] * 8 + ["^^^^^S", "", "", "", "R51^Sudden severe headache^I10"]
    segments = [
        f"MSH|^~\\&|RIS|HOSP_A|RADSTREAM|RADSTREAM|20250101120000||ORM^O01|BENCH{number}|P|2.5",
        f"PID|1||MRN{number}^^^HOSP_A^MR||DOE^JOHN||19700101|M|||1 Main St^^Reno^NV^89501",
        "PV1|1|E|ED^12^1^HOSP_A",
        f"ORC|NW|PL{number}||||^^^^^S",
        "|".join(obr),
    ]
    return VT + ("\r".join(segments) + "\r").encode() + FS_CR


async def _send(port: int, messages: list[bytes]) -> int:
    """Send ``messages`` on one connection, one at a time; return how many got AA."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    accepted = 0
    try:
        for message in messages:
            writer.write(message)
            await writer.drain()
            ack = await reader.readuntil(FS_CR)
            accepted += b"MSA|AA|" in ack
    finally:
        writer.close()
    return accepted


def measure(port: int, messages: list[bytes], connections: int) -> tuple[float, int]:
    """(messages/s, accepted) for ``messages`` split over ``connections``."""
    shares = [messages[i::connections] for i in range(connections)]

    async def run() -> list[int]:
        return await asyncio.gather(*(_send(port, share) for share in shares))

    started = time.perf_counter()
    accepted = sum(asyncio.run(run()))
    return len(messages) / (time.perf_counter() - started), accepted


# ---------------------------------------------------------------- the peer: hl7's asyncio MLLP server


async def _echo_server(port: int) -> None:
    import hl7.mllp

    async def on_connection(reader, writer) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                writer.writemessage(message.create_ack())
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await hl7.mllp.start_hl7_server(on_connection, "127.0.0.1", port, limit=1024 * 1024)
    async with server:
        await server.serve_forever()


def _wait_port(port: int, proc) -> None:
    procs.wait_for_port("127.0.0.1", port, 30, proc)


def count_on_topic(settings: Settings) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"bench-{time.time()}"})
    topic = ORDER_RECEIVED.name(settings)
    total = 0
    try:
        for partition in range(settings.kafka.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            total += high - low
    finally:
        consumer.close()
    return total


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--peer-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_server:
        asyncio.run(_echo_server(args.peer_server))
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-mllp-") as tmp:
        settings = load_settings(
            data_dir=Path(tmp) / "data", log_level="WARNING",
            kafka={"embedded_port": procs.free_port(), "storage": "memory://tansu/", "partitions": 4},
            blobs={"backend": "local"},
            hl7={"port": procs.free_port()}, metrics={"gateway_port": 0, "worker_port": 0, "hl7_gateway_port": 0},
        )
        peer_port = procs.free_port()
        env = {**os.environ, **settings.to_env(), "RADSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap}
        broker = procs.start_tansu(settings.bind_host, settings.kafka.embedded_port, "memory://tansu/",
                                   log_path=Path(tmp) / "tansu.log")
        children = [broker]
        try:
            ensure_topics(settings)
            peer = procs.spawn([sys.executable, "-m", "load.bench_mllp", "--peer-server", str(peer_port)], env=env,
                               log_path=Path(tmp) / "peer.log")
            gateway = procs.spawn(procs.python_module("gateways.hl7_mllp"), env=env, log_path=Path(tmp) / "hl7.log")
            children += [peer, gateway]
            _wait_port(peer_port, peer)
            _wait_port(settings.hl7.port, gateway)
            measure(settings.hl7.port, [orm(-i) for i in range(1, 51)], 1)  # warm-up: producer, connections
            measure(peer_port, [orm(-i) for i in range(1, 51)], 1)
            print(f"messages: {args.messages} ORM^O01 ({len(orm(1))} bytes), broker: tansu memory://, "
                  f"ACK after broker ack (acks=all)", flush=True)
            number = 0
            for connections in args.connections:
                batch = [orm(number + i) for i in range(args.messages)]
                number += args.messages
                peer_rate, peer_ok = measure(peer_port, batch, connections)
                ours_rate, ours_ok = measure(settings.hl7.port, batch, connections)
                print(f"[{connections} connection(s)] hl7 asyncio echo server messages/s: {peer_rate:.0f} "
                      f"(AA {peer_ok}/{len(batch)})")
                print(f"[{connections} connection(s)] radstream HL7 gateway messages/s: {ours_rate:.0f} "
                      f"(AA {ours_ok}/{len(batch)})")
                print(f"[{connections} connection(s)] radstream / hl7-echo = {ours_rate / peer_rate:.2f}", flush=True)
                if ours_ok != len(batch) or peer_ok != len(batch):
                    print("error: not every message was acknowledged AA", file=sys.stderr)
                    return 1
            on_topic = count_on_topic(settings) - 50  # less the warm-up
            print(f"orders on {ORDER_RECEIVED.suffix}: {on_topic}/{number}")
            if on_topic < number:
                print("error: the gateway acknowledged orders that are not on the topic", file=sys.stderr)
                return 1
        finally:
            for child in reversed(children):
                procs.stop(child, grace_s=3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
