# isr: build, test, benchmark, fuzz and demo entry points. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
# Debian packages the build, the tests and the demo need (tests skip nothing silently: they need these).
# QEMU 10 (qemu-system-x86, qemu-utils from bookworm-backports), busybox-static and cpio come from guest/build.sh.
# man-db, zsh, fish and systemd: the packaging test renders the man pages (`man -l`), checks the completion
# scripts (`bash -n`, `zsh -n`, `fish -n`) and the systemd unit (`systemd-analyze verify`).
# libvirt (the `--vmm libvirt` driver and its test): the system daemon with its users and configuration
# (libvirt-daemon-system), the QEMU driver, and virsh. libnbd-bin, python3-libnbd: nbdcopy and nbdsh (NBD tests).
# fuse3: fusermount3, with which a user other than root mounts the guest RAM file (root mounts it directly).
DEB_PACKAGES := zstd e2fsprogs nginx restic pkg-config build-essential openssl chromium libnbd-bin python3-libnbd \
	man-db zsh fish systemd libvirt-daemon-system libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients fuse3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FUZZ_SECONDS ?= 30
DEMO_MIB ?= 512

# Man pages, generated from the command-line definitions (never committed).
MAN_DIR ?= target/man

.PHONY: help deps ui-deps guest fmt-check clippy test bench fuzz demo demo-format pocket man

help:
	@echo "make demo    the whole story: server, parcel from the test guest, resume on client A, suspend, check in,"
	@echo "             resume on client B where it stopped (release build, TCG)"
	@echo "make demo-format  build a parcel from a generated $(DEMO_MIB) MiB image into a local store, read back, verify"
	@echo "make test    deps, then rustfmt check, clippy -D warnings, cargo test --workspace (what CI runs)"
	@echo "make man     man pages of isr and isr-server (one per subcommand) into $(MAN_DIR)"
	@echo "make bench   cargo bench --workspace (codec vs the zstd tool, NBD)"
	@echo "make fuzz    every fuzz target for FUZZ_SECONDS (default 30) seconds (scripts/fuzz.sh)"
	@echo "make deps    install the Debian packages: $(DEB_PACKAGES)"
	@echo "make pocket  Pocket ISR: a statically linked isr in $(POCKET_BIN)"

# Idempotent: asks apt only for what is missing, and refreshes the package lists only then.
deps: guest ui-deps
	@missing=""; \
	for p in $(DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "deps: installing$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@# What udev does on a Debian machine, for a machine without it: /dev/kvm for group kvm. A root-only
	@# /dev/kvm makes libvirtd (whose QEMU user is in group kvm) probe QEMU again at every look-up, so that
	@# creating a domain takes minutes. The daemon itself is started by `isr resume --vmm libvirt`.
	@if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$$(stat -c %G /dev/kvm)" != kvm ]; then \
	  echo "deps: /dev/kvm to group kvm, mode 0660 (as udev would)"; \
	  $(SUDO) chgrp kvm /dev/kvm && $(SUDO) chmod 0660 /dev/kvm; \
	fi

# The web console's npm packages (noVNC, embedded into `isr` at build time; playwright-core for its browser
# test), and Node.js/npm to install them.
UI_WEB := crates/isr-ui/web
ui-deps:
	@command -v npm >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends nodejs npm; }
	@[ -f $(UI_WEB)/node_modules/playwright-core/package.json ] && [ -f $(UI_WEB)/node_modules/@novnc/novnc/core/rfb.js ] \
	  || (cd $(UI_WEB) && npm ci --no-audit --no-fund)

# The test guest (kernel + busybox initramfs + ext4 disk) in guest/out, and QEMU 10 to run it.
guest:
	bash guest/build.sh

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

man:
	$(CARGO) build --workspace --bins
	rm -rf $(MAN_DIR) && mkdir -p $(MAN_DIR)
	target/debug/isr man --output $(MAN_DIR)
	target/debug/isr-server man --output $(MAN_DIR)
	@echo "man pages in $(MAN_DIR): man -l $(MAN_DIR)/isr.1"

# Pocket ISR: `isr` with glibc linked in statically (target x86_64-unknown-linux-gnu, +crt-static; --target keeps
# build scripts and proc macros dynamic). Runs on a machine with nothing installed but QEMU.
POCKET_DIR := target/pocket
POCKET_BIN := $(POCKET_DIR)/x86_64-unknown-linux-gnu/pocket/isr
pocket:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --profile pocket --target x86_64-unknown-linux-gnu \
	  --target-dir $(POCKET_DIR) -p isr-cli --bin isr --features pocket
	@file $(POCKET_BIN) 2>/dev/null || ls -l $(POCKET_BIN)

test: deps fmt-check clippy pocket man
	ISR_POCKET_BIN=$(CURDIR)/$(POCKET_BIN) $(CARGO) test --workspace

bench: deps
	$(CARGO) bench --workspace

fuzz: deps
	scripts/fuzz.sh $(FUZZ_SECONDS)

demo: deps
	$(CARGO) build --release --workspace --bins
	bash scripts/isr-demo.sh

demo-format: deps
	$(CARGO) run --release -p isr-format --example demo -- $(DEMO_MIB)
