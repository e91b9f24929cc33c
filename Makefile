# armvm-build: everything a fresh Debian machine needs, in two commands.
#   make demo   build recipes/debian-arm64.yaml and boot it under QEMU + AAVMF
#   make demo-server   build the arm64 server image (Debian root, ext4) and boot it to login:
#   make test   run the test suite (installs system packages and the venv when missing)
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
ARMVM := $(VENV)/bin/armvm-build
RECIPE ?= recipes/debian-arm64.yaml
PYTEST_ARGS ?=

# Debian packages: QEMU + AAVMF firmware for boots, external validators for tests,
# grub-mkimage for GRUB loaders, gpgv + keyring for the archive, venv for the Python side.
SYSTEM_PACKAGES := qemu-system-arm qemu-efi-aarch64 qemu-efi-arm fdisk dosfstools mtools \
	genimage grub-common bmap-tools gdisk gpgv gnupg debian-archive-keyring xz-utils zstd \
	python3-venv ca-certificates cpio gcc \
	mmdebstrap qemu-user-static binfmt-support arch-test fakeroot e2fsprogs kmod
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-server test system-deps venv bench clean example

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

bench: venv
	$(PY) bench/run.py

clean:
	rm -rf output/*.raw output/*.json output/*.bmap output/*.sha256 .pytest_cache
