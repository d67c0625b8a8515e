# The in-sandbox statx fix (see torpor/agent/compat/statx_compat.c), built with the system
# gcc: `make compat`. The agent preloads the library into the processes it starts when the
# file is there and skips it silently when not, so a failed or skipped build costs only
# the fix. Included by the main Makefile (whose `compat::` is double-colon, so is this).

COMPAT_DIR := $(abspath $(dir $(lastword $(MAKEFILE_LIST)))../torpor/agent/compat)
COMPAT_SO := $(COMPAT_DIR)/libtorpor_compat.so
COMPAT_CC ?= gcc
COMPAT_CFLAGS ?= -O2 -fPIC -shared -fno-stack-protector -Wall -Wextra -Werror

.PHONY: compat compat-clean

compat:: $(COMPAT_SO)

$(COMPAT_SO): $(COMPAT_DIR)/statx_compat.c $(lastword $(MAKEFILE_LIST))
	$(COMPAT_CC) $(COMPAT_CFLAGS) -o $@.tmp $<
	mv -f $@.tmp $@

compat-clean::
	rm -f $(COMPAT_SO) $(COMPAT_SO).tmp
