# The README's two set-up commands: `make run` (default job) and `make test` (the tests).
# Both install everything a fresh machine needs first (Debian data package + pip packages).
PYTHON ?= python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
WORKDIR ?= runs/default
# pytest-xdist worker processes for `make test` (a test file is the unit of distribution)
TEST_WORKERS ?= 2

.PHONY: install run test lint
install:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist)
	$(PYTHON) -m pip install -q -e '.[test]'

run: install
	$(PYTHON) -m cmix_jax.main --config=configs/default.py --workdir=$(WORKDIR)

test: install
	# test_train.py, the longest file (subprocess runs, ~4 min), runs in a process of its own
	# beside the workers, so the suite does not wait for it at the end. Its report is printed
	# after the rest's; either failing fails `make test`.
	@log=$$(mktemp); \
	$(PYTHON) -m pytest -p no:cacheprovider tests/test_train.py >$$log 2>&1 & own=$$!; \
	$(PYTHON) -m pytest -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests \
	  --ignore=tests/test_train.py; rest=$$?; \
	wait $$own; own=$$?; echo '--- tests/test_train.py (own process)'; cat $$log; rm -f $$log; \
	[ $$rest -eq 0 ] && [ $$own -eq 0 ]

lint:  # formatter and linter (Google style, see pyproject.toml)
	$(PYTHON) -m pip install -q ruff
	ruff format --check . && ruff check .
