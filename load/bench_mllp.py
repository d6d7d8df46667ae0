"""Benchmark: the radstream HL7 gateway against the ``hl7`` package's asyncio MLLP echo server.

Both receive the same N ORM^O01 STAT orders over MLLP in the same run, from the same
asyncio client: each connection sends one message and waits for its ACK before the
next (HL7 v2.5 C.4.3), over 1 and over several connections. The peer parses each
message with ``hl7`` and answers ``create_ack()`` (AA) — no Kafka. The radstream gateway
(``python -m gateways.hl7_mllp``, a separate process like the peer) also validates the
message, builds the ``OrderReceived`` event, publishes it to a real Tansu broker and
waits for the broker's ack before answering AA; the ratio is what that guarantee costs.
Every ACK must be AA and every accepted order must be on ``order.received``.

The headline is the durable default, as ``radstream up`` runs it: the broker's log on
``s3://`` in the embedded SeaweedFS. The second line is the broker on ``memory://``,
which shows what the durable log costs. Each runs against its own fresh broker (and
object store); the peer is measured once per connection count.

    python -m load.bench_mllp --messages 2000 [--connections 1 4] [--broker-storage both|s3|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from load.services import BROKER_STORAGES as STORAGES, events_on_topic, running_gateway
from radstream import procs
from schemas.settings import load_settings
from schemas.topics import ORDER_RECEIVED

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


WARM_UP = 50


def run_ours(root: Path, storage: str, batches: list[list[bytes]],
             connections: list[int]) -> tuple[list[tuple[float, int]], int]:
    """Our gateway on a fresh broker whose log is on ``storage``: (messages/s, AA) per
    connection count, and the orders on ``order.received`` less the warm-up."""
    root.mkdir(parents=True)
    settings = load_settings(data_dir=root / "data", log_level="WARNING",
                             **procs.isolated_listeners(kafka={"storage": STORAGES[storage]}))
    with running_gateway(settings, root, "gateways.hl7_mllp", settings.hl7.port):
        measure(settings.hl7.port, [orm(-i) for i in range(1, WARM_UP + 1)], 1)  # producer, connections
        results = [measure(settings.hl7.port, batch, n) for batch, n in zip(batches, connections)]
        return results, events_on_topic(settings, ORDER_RECEIVED) - WARM_UP


def run_peer(root: Path, batches: list[list[bytes]], connections: list[int]) -> list[tuple[float, int]]:
    """The hl7 echo server, in its own process like the gateway: (messages/s, AA) per connection count."""
    port = procs.free_port()
    peer = procs.spawn([sys.executable, "-m", "load.bench_mllp", "--peer-server", str(port)],
                       log_path=root / "peer.log")
    try:
        procs.wait_for_port("127.0.0.1", port, 30, peer)
        measure(port, [orm(-i) for i in range(1, WARM_UP + 1)], 1)
        return [measure(port, batch, n) for batch, n in zip(batches, connections)]
    finally:
        procs.stop(peer, grace_s=3)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--broker-storage", choices=["both", "s3", "memory"], default="both",
                        help="the broker's log: s3:// (the durable default, the headline), memory://, or both")
    parser.add_argument("--peer-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_server:
        asyncio.run(_echo_server(args.peer_server))
        return 0
    if args.messages < 1 or min(args.connections) < 1:
        parser.error("--messages and --connections must be at least 1")
    storages = ["s3", "memory"] if args.broker_storage == "both" else [args.broker_storage]
    batches = [[orm(k * args.messages + i) for i in range(args.messages)] for k in range(len(args.connections))]
    print(f"messages: {args.messages} ORM^O01 ({len(orm(1))} bytes) per connection count, "
          f"ACK after broker ack (acks=all)", flush=True)
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-mllp-") as tmp:
        peer = run_peer(Path(tmp), batches, args.connections)
        for (rate, accepted), connections in zip(peer, args.connections):
            print(f"[{connections} connection(s)] hl7 asyncio echo server messages/s: {rate:.0f} "
                  f"(AA {accepted}/{args.messages})", flush=True)
            failed |= accepted != args.messages
        for storage in storages:
            ours, on_topic = run_ours(Path(tmp) / storage, storage, batches, args.connections)
            label = "radstream" if storage == "s3" else f"radstream[{STORAGES[storage]}]"
            for (rate, accepted), (peer_rate, _), connections in zip(ours, peer, args.connections):
                print(f"[{connections} connection(s)] radstream HL7 gateway, broker {STORAGES[storage]}, "
                      f"messages/s: {rate:.0f} (AA {accepted}/{args.messages})")
                print(f"[{connections} connection(s)] {label} / hl7-echo = {rate / peer_rate:.2f}", flush=True)
                failed |= accepted != args.messages
            expected = args.messages * len(args.connections)
            print(f"orders on {ORDER_RECEIVED.suffix} (broker {STORAGES[storage]}): {on_topic}/{expected}", flush=True)
            if on_topic < expected:
                print("error: the gateway acknowledged orders that are not on the topic", file=sys.stderr)
                failed = True
    if failed:
        print("error: not every message was acknowledged AA, or not every order is on the topic", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
