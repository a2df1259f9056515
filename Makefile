# make test  - every test, as root, in a local venv made from the pinned requirements
# make run   - build, make dev certificates, serve on localhost
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: test venv clean stubs

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP) $(STUBS)
	$(VPY) -m pytest -q -ra test_jobworker.py

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis __pycache__ jobworker.pyz

STUBS := jobworker_pb2.py jobworker_pb2_grpc.py
stubs: $(STUBS)
$(STUBS): jobworker.proto $(STAMP)
	$(VPY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. jobworker.proto
