# The two commands of README.md. Everything they need is installed by scripts/bootstrap.sh.
.PHONY: run test bootstrap bench

bootstrap:
	@scripts/bootstrap.sh

# Start the embedded runtime, send real DICOM studies through it and show the worklist;
# it keeps running (Ctrl-C stops everything).
run: bootstrap
	.venv/bin/radstream up --demo

test: bootstrap
	.venv/bin/python -m pytest -q -ra

bench: bootstrap
	.venv/bin/python -m load.bench_gateway
