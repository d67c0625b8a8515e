# Torpor: `make serve` runs the server, `make test` runs the suite. Both install what is
# missing first (Debian packages, the venv) and are safe to run again.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
DATA ?= $(or $(TORPOR_DATA),/var/lib/torpor)
HOST ?= 127.0.0.1
PORT ?= 7070
# the preview listener; a second server on this host needs another (0 turns previews off)
PREVIEW_PORT ?= $(or $(TORPOR_PREVIEW_PORT),7071)
# libnss-myhostname: `*.localhost` names (the default preview URLs, 8000-<id>.localhost)
# resolve to loopback for every program on the host, Python's resolver included; its
# package adds `myhostname` to nsswitch.conf's hosts line
# skopeo, umoci, mmdebstrap: template sources (an OCI image from a registry or an archive, a
# Debian suite); docker-registry and busybox-static: the local registry and the image the
# template source tests make
APT_PKGS := e2fsprogs mount util-linux iproute2 python3 python3-venv python3-dev gcc libc6-dev \
            libnss-myhostname skopeo umoci mmdebstrap docker-registry busybox-static \
            tmux

# runsc from Debian, at least this version: older ones (bookworm's 0.0~20221219) cannot
# checkpoint event-loop servers and only write compressed images (slower deep resume). On
# bookworm it comes from Debian's bookworm-backports suite, pinned to this one package.
RUNSC_MIN := 0.0~20240729
BACKPORTS_LIST := /etc/apt/sources.list.d/torpor-bookworm-backports.list

.PHONY: serve test deps runsc venv lint bench clean-test

serve: deps venv compat
	$(VENV)/bin/torpor serve --host $(HOST) --port $(PORT) --preview-port $(PREVIEW_PORT) \
	  --data-dir $(DATA)

test: deps venv compat
	$(VENV)/bin/ruff check torpor tests bench
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Debian packages: only asks apt when something is missing, so a second run is instant.
deps: runsc
	@missing=""; \
	for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

runsc:
	@have=$$(dpkg-query -W -f='$${Status} $${Version}' runsc 2>/dev/null | sed -n 's/^install ok installed //p'); \
	if [ -n "$$have" ] && dpkg --compare-versions "$$have" ge "$(RUNSC_MIN)"; then exit 0; fi; \
	. /etc/os-release; target=""; \
	if [ "$$VERSION_CODENAME" = bookworm ]; then \
	  target="-t bookworm-backports"; \
	  test -f $(BACKPORTS_LIST) || echo "deb http://deb.debian.org/debian bookworm-backports main" > $(BACKPORTS_LIST); \
	fi; \
	echo "installing runsc >= $(RUNSC_MIN) (have: $${have:-none}) $$target"; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$target runsc; \
	have=$$(dpkg-query -W -f='$${Status} $${Version}' runsc 2>/dev/null | sed -n 's/^install ok installed //p'); \
	if [ -z "$$have" ]; then echo "runsc could not be installed (see apt's output above)" >&2; exit 1; fi; \
	dpkg --compare-versions "$$have" ge "$(RUNSC_MIN)" || { echo "runsc $$have is older than $(RUNSC_MIN): Torpor runs, but cannot hibernate event-loop servers and resumes slower" >&2; }

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[server,dev]'
	@touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check torpor tests bench

bench: deps venv compat
	$(VENV)/bin/python bench/foundation.py

-include mk/compat.mk
# mk/compat.mk defines `compat` (the in-sandbox statx fix); keep the target if it is absent
compat::
