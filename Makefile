# The two commands a newcomer needs:
#   make run    install what the proxy needs and run it (no config: embedded llama.cpp + Gemma)
#   make test   install what the tests need, lint, type-check and run every test
.PHONY: run test lint pytest bench bench-proxy screenshot clean

run:
	scripts/bootstrap run
	.venv/bin/python -m app $(ARGS)

test:
	scripts/bootstrap dev
	$(MAKE) lint
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check .
	.venv/bin/mypy

pytest:
	.venv/bin/python -m pytest $(ARGS)

bench:
	scripts/bootstrap bench
	.venv/bin/python -m bench.core $(ARGS)

bench-proxy:
	scripts/bootstrap bench
	.venv/bin/python -m bench $(ARGS)

# The dashboard after a minute of traffic on two real llama.cpp servers, in headless Chromium:
# docs/dashboard.png (the README shows it).
screenshot:
	scripts/bootstrap dev
	.venv/bin/python -m tests.integration.browser docs/dashboard.png $(ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache .tox
