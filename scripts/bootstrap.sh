#!/usr/bin/env bash
# Creates .venv and installs everything radstream and its tests need on a fresh machine:
# Python packages from PyPI (the project, its test extras) and the Debian packages of the
# real peers the tests talk to (dcmtk). Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "radstream needs Python >= 3.11 (found $("$PYTHON" --version))" >&2
  exit 1
fi

# Real peers of the tests: dcmtk (storescu/echoscu as a modality, dcmdump), dicom3tools
# (dciodvfy: IOD conformance of de-identified output), Orthanc with its DICOMweb plugin
# (a real PACS: C-STORE and STOW-RS sender, ingest benchmark peer), chromium and its
# chromedriver (a real browser on the dashboard, headless, driven by Selenium).
need_apt=()
command -v /usr/bin/storescu >/dev/null 2>&1 || need_apt+=(dcmtk)
command -v /usr/bin/dciodvfy >/dev/null 2>&1 || need_apt+=(dicom3tools)
command -v /usr/sbin/Orthanc >/dev/null 2>&1 || need_apt+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_apt+=(orthanc-dicomweb)
command -v /usr/bin/chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v /usr/bin/chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
if ((${#need_apt[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "== installing Debian packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.radstream-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "== installing Python packages"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
