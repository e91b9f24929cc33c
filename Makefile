# armvm-build: everything a fresh Debian machine needs, in two commands.
#   make demo   build recipes/debian-arm64.yaml and boot it under QEMU + AAVMF
#   make demo-server   build the arm64 server image (Debian root, ext4) and boot it to login:
#   make test   run the test suite (installs system packages and the venv when missing)
#   make fresh-check   (root) both of the above in a clean Debian 12 chroot: .ci/fresh-check
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
ARMVM := $(VENV)/bin/armvm-build
RECIPE ?= recipes/debian-arm64.yaml
PYTEST_ARGS ?=

# Debian packages: QEMU + AAVMF firmware for boots; grub-mkimage for GRUB loaders; gpgv +
# keyring for the archive; the venv for the Python side; external judges for the tests
# (sfdisk, sgdisk, fsck.fat, mtools, genimage, bmaptool, losetup, cpio, gpg, gcc for test
# modules); mmdebstrap + git for make fresh-check; mmdebstrap, qemu-user-static, binfmt-support,
# arch-test, fakeroot, e2fsprogs and kmod for root file systems; sbsigntool (sbsign, sbverify)
# judges Secure Boot signatures in the tests; qemu-utils (qemu-img) and chromium (headless,
# renders <name>.report.html in the tests). make itself: the README's
# prerequisite line.
SYSTEM_PACKAGES := qemu-system-arm qemu-efi-aarch64 qemu-efi-arm fdisk dosfstools mtools \
	genimage grub-common bmap-tools gdisk gpgv gnupg debian-archive-keyring xz-utils zstd \
	python3-venv ca-certificates cpio gcc mount mmdebstrap git \
	qemu-user-static binfmt-support arch-test fakeroot e2fsprogs kmod qemu-utils sbsigntool chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-server test system-deps venv bench clean example fresh-check

system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing missing Debian packages:" $$missing; \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: system-deps $(VENV)/.installed

demo: venv
	$(ARMVM) $(RECIPE)
	$(ARMVM) boot output/$(basename $(notdir $(RECIPE))).raw

demo-server: venv
	$(ARMVM) recipes/debian-arm64-server.yaml
	$(ARMVM) boot output/debian-arm64-server.raw --until-login

test: venv
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

# The README's two commands on a clean Debian 12 minbase chroot (root; see README).
fresh-check:
	@[ "$$(id -u)" = 0 ] || { echo "make fresh-check needs root (mmdebstrap, bind mounts): sudo make fresh-check" >&2; exit 1; }
	$(MAKE) --no-print-directory system-deps
	.ci/fresh-check

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf output/*.raw output/*.json output/*.bmap output/*.sha256 .pytest_cache
