# The two commands of the README. Both set up everything first (scripts/setup.sh is idempotent).
.PHONY: lab test setup bench lint mutants hub

setup:
	./scripts/setup.sh

lab: setup
	.venv/bin/jupyter lab --config=jupyter_config.py

# A local JupyterHub with tabbi in hub mode (demo users alice and bob): http://127.0.0.1:8000/
hub: setup
	.venv/bin/jupyterhub -f hub/jupyterhub_config.py

lint: setup
	.venv/bin/ruff check .

test: setup
	.venv/bin/ruff check .
	cd convex && npx vitest run
	.venv/bin/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile

bench: setup
	cd bench && ../.venv/bin/python bench_start.py
	cd bench && ../.venv/bin/python bench_latency.py
	cd bench && ../.venv/bin/python bench_import.py
	cd bench && ../.venv/bin/python bench_lifecycle.py
	cd bench && ../.venv/bin/python bench_snapshots.py
	cd bench && ../.venv/bin/python bench_load.py
	cd bench && ../.venv/bin/python bench_push.py
	cd bench && ../.venv/bin/python bench_panel.py
	node --disable-warning=MODULE_TYPELESS_PACKAGE_JSON bench/bench_markdown.mjs
	cd bench && ../.venv/bin/python bench_store.py
	cd bench && ../.venv/bin/python bench_modal.py

# Guarantee mutants (slow, not part of `make test`): break each guarantee of tests/mutants.toml in
# a scratch copy and check that its tests fail. `make mutants ARGS="-j 2 turn-deadline"` passes on.
mutants: setup
	.venv/bin/python scripts/mutants.py $(ARGS)
