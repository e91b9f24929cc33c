"""armvm-build: raw disk images for ARM VMs (ARM VM System Specification), built and checked."""

__version__ = "0.1.0"
