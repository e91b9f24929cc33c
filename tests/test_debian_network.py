"""Against the real Debian archive (mirror from find_mirror(), the host's archive keyring)."""
from __future__ import annotations

import os
import re

import pytest

from builder.inputs.cache import Cache
from builder.inputs.debian.archive import DEFAULT_KEYRING, DebianArchive
from builder.inputs.debian.deb import read_control
from builder.inputs.debian.mirror import find_mirror
from builder.inputs.sources import Fetcher

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(os.environ.get("ARMVM_OFFLINE_TESTS") == "1",
                       reason="ARMVM_OFFLINE_TESTS=1"),
    pytest.mark.skipif(not DEFAULT_KEYRING.is_file(), reason="debian-archive-keyring missing"),
]


def test_trixie_arm64_kernel_and_busybox(tmp_path):
    fetcher = Fetcher(cache=Cache(tmp_path / "cache"), progress=False)
    archive = DebianArchive(fetcher, mirror=find_mirror(), suite="trixie", components=["main"],
                            arch="arm64")
    kernel = archive.resolve_kernel("linux-image-cloud-arm64")
    assert re.fullmatch(r"linux-image-\d+\.\d+[^ ]*-cloud-arm64", kernel.name), kernel.name
    assert kernel.architecture == "arm64" and kernel.filename.endswith("_arm64.deb")
    busybox = archive.resolve("busybox-static")
    art = archive.fetch(busybox)
    assert art.size == busybox.size and art.origin.startswith("debian:busybox-static=")
    control = read_control(art.path)
    assert control["Package"] == "busybox-static" and control["Architecture"] == "arm64"
    tree = archive.extract(art)
    assert (tree / "usr/bin/busybox").is_file()
