# `make demo` / `make test`: the same as `python3 dev.py demo` / `python3 dev.py test` (see dev.py), for those
# who type make. ARGS is passed on, e.g. `make demo ARGS=--quick`, `make test ARGS="-x tests/unit"`.
PYTHON ?= python3

.PHONY: demo test
demo:
	$(PYTHON) dev.py demo $(ARGS)
test:
	$(PYTHON) dev.py test $(ARGS)
