"""Running images: QEMU, the boot runner, the runtime checks matrix."""
