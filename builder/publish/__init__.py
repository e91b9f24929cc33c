"""Staging, rename, manifest, bmap and the other outputs."""
