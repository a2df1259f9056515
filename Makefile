# make run   - build jobworker.pyz, make dev certificates in ./certs, serve on localhost:50051
#              (a second dev server beside it: make run PORT=50052 STATE=build/state2
#              CGROUP_PARENT=jobworker-dev2)
# make test  - every test, as root, in a local venv made from the pinned requirements
# make fast  - the fast tier: no root, no QEMU, no namespaces (as any user, from a fresh clone)
# make pyz   - build jobworker.pyz only
# make stubs - the generated gRPC modules, for running jobworker.py from the source tree
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
STUBS  := jobworker_pb2.py jobworker_pb2_grpc.py
# The pyz bundles these CPython versions for this machine's architecture.
PYZ_PYTHONS ?= 3.10,3.11,3.12,3.13

# System tools the tests use, each with the Debian package that provides it: node and npm run
# grpc-js against the server (the proto from another gRPC stack); qemu boots the cgroup v2 guest
# (v2_guest.py); tmux is the real terminal of the interactive tests (run -it, attach). Only the
# packages of missing tools are installed: a host whose node comes from elsewhere (nodesource's
# nodejs conflicts with Debian's npm) keeps it.
# JOBWORKER_SKIP_V2_GUEST=1 skips the guest and does not install qemu.
TOOLS := openssl:openssl ip:iproute2 nsenter:util-linux node:nodejs npm:npm tmux:tmux \
         $(if $(JOBWORKER_SKIP_V2_GUEST),,qemu-system-x86_64:qemu-system-x86)
PEERS := runc:runc cgcreate:cgroup-tools sshd:openssh-server ssh-keygen:openssh-client \
         bwrap:bubblewrap

PORT          ?= 50051
STATE         ?= build/state
CGROUP_PARENT ?= jobworker
# the slowest tests are named at the end, so that their cost is seen
PYTEST := $(VPY) -m pytest -q -ra --durations=15

.PHONY: test fast venv stubs pyz run clean system-deps bench bench-deps

test: system-deps $(STAMP) $(STUBS)
	$(PYTEST) test_jobworker.py

fast: $(STAMP) $(STUBS)
	$(PYTEST) -p no:cacheprovider -m "not slow and not root" test_jobworker.py

# apt-get install of what is missing among $(1) (command:package ...)
define install-missing
	@missing=""; for t in $(1); do PATH="$$PATH:/usr/sbin:/sbin" command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends $$missing >/dev/null; \
	fi
endef

system-deps:
	$(call install-missing,$(TOOLS))

# the tools figure 21 compares jobworker with (their daemons are not started: sshd runs on a
# port of the bench's own, with its own config and keys)
bench-deps:
	$(call install-missing,$(PEERS))

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-*
	touch $@

stubs: $(STUBS)

$(STUBS): jobworker.proto $(STAMP)
	$(VPY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. jobworker.proto

pyz: jobworker.pyz

jobworker.pyz: jobworker.py jobworker.proto build_zipapp.py zipapp_main.py requirements.txt $(STAMP)
	$(VPY) build_zipapp.py -o $@ --python $(PYZ_PYTHONS)

# Development certificates (private keys never leave certs/, which git ignores).
certs/server.crt: | jobworker.pyz
	./jobworker.pyz certs init certs

certs/client.crt: certs/server.crt
	./jobworker.pyz certs issue certs client --role writer
	./jobworker.pyz certs issue certs admin --role admin
	./jobworker.pyz certs issue certs reader --role reader

run: jobworker.pyz certs/client.crt
	@echo "jobworker serves on localhost:$(PORT). From another terminal in $(CURDIR):"
	@$(if $(filter-out 50051,$(PORT)),echo "    export JOBWORKER_SERVER=localhost:$(PORT)",true)
	@echo "    ID=\$$(./jobworker.pyz start bash -c 'while true; do echo hello; sleep 1; done' --cpu 50% --memory 256M --disk-io 10MB/s)"
	@echo "    ./jobworker.pyz stream \$$ID        # output from byte 0, then live; Ctrl-C leaves, the job goes on"
	@echo "    ./jobworker.pyz query \$$ID         # state, exit, limits, usage; --json for scripts"
	@echo "    ./jobworker.pyz list"
	@echo "    ./jobworker.pyz stop \$$ID          # SIGTERM, SIGKILL after 10 s (--grace)"
	@echo "    ./jobworker.pyz run --memory 64M -- sh -c 'echo hi; exit 3'; echo \$$?   # 3"
	./jobworker.pyz serve --listen localhost:$(PORT) --certs certs --state-dir $(STATE) --cgroup-parent $(CGROUP_PARENT)

clean:
	rm -rf $(VENV) build .pytest_cache .hypothesis __pycache__ jobworker.pyz $(STUBS)

bench: $(STAMP) $(STUBS) jobworker.pyz bench-deps
	$(VPY) bench/run.py jobworker.pyz
