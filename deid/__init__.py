"""The de-identification engine: PS3.15 Annex E applied to one PS3.10 instance.

The profile, the per-site policy and the key scheme are contract data in
:mod:`schemas.deid`; this package applies them with pydicom (:mod:`deid.engine`), for
the de-identification stage, the PHI scanner and the benchmark alike.
"""
