"""Benchmark: the deidentify stage's engine against dicognito and dicom-anonymizer (PyPI).

All three de-identify the same real files (pydicom's CT_small and MR_small, pydicom-data's
chest CR and head CT), held in memory, on one core (the process pins itself to CPU 0),
in the same run: bytes in -> de-identified PS3.10 bytes out, so every tool pays for
parsing and writing. Ours does the full PS3.15 Annex E table with the three options,
keyed UID remapping, the burned-in check and the method code sequence; the peers run
their defaults. Each tool runs in a fresh process of its own: a process's allocator state
depends on what ran in it before (one 22 MB allocation, such as ours parsing the
standard's IOD tables once, makes glibc serve the peers' multi-megabyte pixel copies
from the heap and speeds them up by half), so no tool may inherit another's. Prints
instances/s per tool and ``ours / peer = ratio`` lines.

    python -m load.bench_deidentify [--seconds 3] [--same-process]

Measured 2026-12-07 on the shared 2-core machine: ours 271-328 instances/s, dicognito
42.5-51, ``ours / dicognito`` 5.7-7.7 over 4 runs (4.2 that morning before the engine read
event fields and unchanged UIDs from raw bytes and stopped converting every element
twice; cProfile counted 2.59 M calls per 240 instances before, 1.76 M after).
"""

from __future__ import annotations

import argparse
import io
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filewriter import dcmwrite

FILES = ("CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "693_UNCR.dcm")


def load_files() -> list[bytes]:
    out = []
    for name in FILES:
        path = get_testdata_file(name, download=False)
        if not path:
            raise SystemExit(f"{name} missing: pip install pydicom-data")
        with open(path, "rb") as fh:
            out.append(fh.read())
    return out


def ours() -> Callable[[bytes], bytes]:
    from deid.engine import deidentify_instance
    from schemas.deid.keys import DeidKeys
    from schemas.deid.policy import load_policy

    policy, keys = load_policy().defaults, DeidKeys(os.urandom(32))
    return lambda data: deidentify_instance(data, policy, keys).data


def _via_pydicom(anonymize: Callable) -> Callable[[bytes], bytes]:
    def run(data: bytes) -> bytes:
        ds = dcmread(io.BytesIO(data))
        anonymize(ds)
        out = io.BytesIO()
        dcmwrite(out, ds)
        return out.getvalue()
    return run


def dicognito() -> Callable[[bytes], bytes]:
    from dicognito.anonymizer import Anonymizer

    return _via_pydicom(Anonymizer().anonymize)


def dicom_anonymizer() -> Callable[[bytes], bytes]:
    from dicomanonymizer import anonymize_dataset

    return _via_pydicom(anonymize_dataset)


def measure(tool: Callable[[bytes], bytes], files: list[bytes], seconds: float) -> float:
    for data in files:  # warm-up: imports, caches
        tool(data)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for data in files:
            tool(data)
        done += len(files)
    return done / (time.perf_counter() - started)


TOOLS = {"ours": ours, "dicognito": dicognito, "dicom-anonymizer": dicom_anonymizer}


def rate_in_this_process(name: str, seconds: float) -> float:
    logging.disable(logging.WARNING)  # dicom-anonymizer logs every tag it touches
    return measure(TOOLS[name](), load_files(), seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0, help="time per tool")
    parser.add_argument("--same-process", action="store_true",
                        help="the earlier method: all tools one after another in this process (ours first)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rates = {}
    for name in TOOLS:  # a fresh process per tool (spawned: nothing inherited but the CPU pinning)
        if args.same_process:
            rates[name] = rate_in_this_process(name, args.seconds)
        else:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                rates[name] = pool.submit(rate_in_this_process, name, args.seconds).result()
        print(f"{name:18s} {rates[name]:8.1f} instances/s")
    for peer in ("dicognito", "dicom-anonymizer"):
        print(f"ours / {peer} = {rates['ours'] / rates[peer]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
