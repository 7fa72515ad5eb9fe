# The two commands a fresh machine needs (see README.md). Each does its own set-up.
.PHONY: demo test

demo:
	scripts/bootstrap.sh
	.venv/bin/python -m raysam.run region=demo model=demo

test:
	scripts/bootstrap.sh dev
	.venv/bin/python -m pytest
