# The two commands a fresh machine needs (see README.md). Each does its own set-up.
.PHONY: demo test

demo:
	scripts/bootstrap.sh
	.venv/bin/python -m raysam.run region=demo model=demo

# Run serially, the suite left 2 cores half idle (Ray starting, runs in subprocesses): two pytest
# workers, each taking whole test files (--dist loadfile, in pyproject.toml), took it from 958 s to
# 680 s on 2 cores. More workers start more Ray instances at once.
TEST_WORKERS ?= 2

test:
	scripts/bootstrap.sh dev
	.venv/bin/python -m pytest -n $(TEST_WORKERS)
