# The two commands of the README. Both set up everything first (scripts/setup.sh is idempotent).
.PHONY: lab test setup bench lint

setup:
	./scripts/setup.sh

lab: setup
	.venv/bin/jupyter lab --config=jupyter_config.py

lint: setup
	.venv/bin/ruff check .

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -p no:cacheprovider

bench: setup
	cd bench && ../.venv/bin/python bench_start.py
	cd bench && ../.venv/bin/python bench_latency.py
	cd bench && ../.venv/bin/python bench_import.py
	cd bench && ../.venv/bin/python bench_lifecycle.py
	cd bench && ../.venv/bin/python bench_load.py
	cd bench && ../.venv/bin/python bench_push.py
