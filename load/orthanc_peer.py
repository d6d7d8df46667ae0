"""Orthanc (with its DICOMweb plugin) as a peer for tests and benchmarks.

Started the way DOMAIN.md says: a JSON configuration in a temporary directory, free
high ports, ``RemoteAccessAllowed: false``, its own storage directory and
``TCP_NODELAY=1`` in its environment. ``dicomweb_servers`` become the plugin's
``DicomWeb.Servers`` entries, so Orthanc can STOW-RS to radstream
(``POST /dicom-web/servers/<name>/stow``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from radstream import procs

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


@dataclass
class Orthanc:
    proc: subprocess.Popen
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | dict[str, Any] | None = None,
                timeout_s: float = 120) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def stop(self) -> None:
        procs.stop(self.proc, grace_s=5)


def start_orthanc(workdir: Path, dicomweb_servers: dict[str, dict[str, Any]] | None = None,
                  timeout_s: float = 60) -> Orthanc:
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = procs.free_port(), procs.free_port()
    config = {
        "Name": "radstream-peer",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpTimeout": 120,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers or {}},
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    proc = procs.spawn([ORTHANC, str(config_path)], env={**os.environ, "TCP_NODELAY": "1"},
                       log_path=workdir / "orthanc.log")
    orthanc = Orthanc(proc, http_port)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            orthanc.request("GET", "/system", timeout_s=2)
            return orthanc
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                orthanc.stop()
                raise RuntimeError(f"Orthanc did not start; see {workdir / 'orthanc.log'}") from None
            time.sleep(0.1)
