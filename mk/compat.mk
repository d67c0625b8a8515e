# Native helpers of the in-sandbox agent, built with the system gcc: `make compat`.
# - libtorpor_compat.so: the statx fix (torpor/agent/compat/statx_compat.c), preloaded into
#   the processes the agent starts;
# - _torpor_native*.so: a CPython extension (compat/native.c) that starts processes with
#   ~120 fewer system calls than posix_spawn, and lets the agent check whether the kernel
#   needs the statx fix at all. Built for the interpreter the agent runs on in sandboxes
#   (the host's /usr/bin/python3), and only if its headers are installed (python3-dev);
#   without it the agent uses os.posix_spawn and always preloads the statx fix.
# - torpor/agent/__pycache__: the agent's bytecode, compiled by that same interpreter. In
#   the sandbox the agent's directory is read-only (and the interpreter runs with -B), so
#   without these it compiles its modules from source at every start: ~30 ms in gVisor.
#   Python checks each against its source's mtime and size, so a stale one is ignored.
# The agent uses each file when it is there and silently does without it when not.
# Included by the main Makefile (whose `compat::` is double-colon, so is this).

COMPAT_DIR := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))../torpor/agent/compat)
COMPAT_SO := $(COMPAT_DIR)/libtorpor_compat.so
COMPAT_AGENT_DIR := $(patsubst %/,%,$(dir $(COMPAT_DIR)))
COMPAT_PYC_STAMP := $(COMPAT_AGENT_DIR)/__pycache__/.compiled
COMPAT_CC ?= gcc
COMPAT_CFLAGS ?= -O2 -fPIC -shared -fno-stack-protector -Wall -Wextra -Werror
# Every process in a sandbox loads the statx fix: keep that cheap (two mappings, no RELRO
# mprotect, no init/fini code).
COMPAT_PRELOAD_FLAGS ?= -fno-plt -nostartfiles -Wl,-z,noseparate-code -Wl,-z,norelro \
	-Wl,--hash-style=gnu

COMPAT_PYTHON ?= /usr/bin/python3
COMPAT_PY_INCLUDE := $(shell $(COMPAT_PYTHON) -c \
	'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)
COMPAT_PY_SUFFIX := $(shell $(COMPAT_PYTHON) -c \
	'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)
COMPAT_NATIVE := $(if $(wildcard $(COMPAT_PY_INCLUDE)/Python.h),\
	$(COMPAT_DIR)/_torpor_native$(COMPAT_PY_SUFFIX))

.PHONY: compat compat-clean

compat:: $(COMPAT_SO) $(COMPAT_NATIVE) $(COMPAT_PYC_STAMP)
ifeq ($(COMPAT_NATIVE),)
	@echo "compat: no Python.h for $(COMPAT_PYTHON) (python3-dev): building without _torpor_native"
endif

$(COMPAT_SO): $(COMPAT_DIR)/statx_compat.c $(lastword $(MAKEFILE_LIST))
	$(COMPAT_CC) $(COMPAT_CFLAGS) $(COMPAT_PRELOAD_FLAGS) -o $@.tmp $<
	mv -f $@.tmp $@

$(COMPAT_NATIVE): $(COMPAT_DIR)/native.c $(lastword $(MAKEFILE_LIST))
	$(COMPAT_CC) $(COMPAT_CFLAGS) -I$(COMPAT_PY_INCLUDE) -o $@.tmp $<
	mv -f $@.tmp $@

$(COMPAT_PYC_STAMP): $(wildcard $(COMPAT_AGENT_DIR)/*.py)
	$(COMPAT_PYTHON) -m compileall -q -l $(COMPAT_AGENT_DIR)
	@touch $@

compat-clean::
	rm -f $(COMPAT_DIR)/*.so $(COMPAT_DIR)/*.tmp
