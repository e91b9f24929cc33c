"""What goes onto the disk: kernel, initramfs, loader or UKI, root file system."""
