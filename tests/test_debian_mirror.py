"""find_mirror: --mirror, $ARMVM_MIRROR, then apt sources under a fake root."""
from __future__ import annotations

from pathlib import Path

import pytest

from builder.inputs.debian.mirror import find_mirror
from builder.errors import ArmvmError

DEB822 = """\
Types: deb
# a comment inside the stanza
URIs: http://security.example.test/debian-security
Suites: trixie-security
Components: main

Types: deb-src
URIs: http://src.example.test/debian
Suites: trixie
Components: main

Types: deb
URIs: http://disabled.example.test/debian
Suites: trixie
Components: main
Enabled: no

Types: deb
URIs: http://updates-first.example.test/debian/
Suites: trixie-updates
Components: main

Types: deb deb-src
URIs: http://archive.example.test/debian/
Suites: trixie trixie-updates
Components: main contrib
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def fake_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / "root" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path / "root"


def test_deb822_prefers_plain_debian_suite(tmp_path):
    root = fake_root(tmp_path, {"etc/apt/sources.list.d/debian.sources": DEB822})
    assert find_mirror(root=root, environ={}) == "http://archive.example.test/debian"


def test_one_line_sources_with_options(tmp_path):
    root = fake_root(tmp_path, {
        "etc/apt/sources.list": (
            "# deb http://commented.example.test/debian trixie main\n"
            "deb http://security.example.test/debian-security bookworm-security main\n"
            "deb [arch=amd64 signed-by=/usr/share/keyrings/x.gpg] "
            "https://one.example.test/debian bookworm main # trailing\n"),
        "etc/apt/sources.list.d/zz.list": "deb http://later.example.test/debian sid main\n",
    })
    assert find_mirror(root=root, environ={}) == "https://one.example.test/debian"


def test_non_debian_suites_are_ignored(tmp_path):
    root = fake_root(tmp_path, {
        "etc/apt/sources.list": "deb http://ubuntu.example.test/ubuntu noble main\n",
        "etc/apt/sources.list.d/ppa.list": "deb http://ppa.example.test/x jammy main\n",
        "etc/apt/sources.list.d/flat.sources": "Types: deb\nURIs: http://flat.example.test/\n"
                                                "Suites: /\n"})
    with pytest.raises(ArmvmError) as err:
        find_mirror(root=root, environ={})
    assert "--mirror URL" in str(err.value) and "ARMVM_MIRROR" in str(err.value)


def test_only_updates_suite_is_still_used(tmp_path):
    root = fake_root(tmp_path, {
        "etc/apt/sources.list": "deb http://upd.example.test/debian bookworm-updates main\n"})
    assert find_mirror(root=root, environ={}) == "http://upd.example.test/debian"


def test_explicit_and_environment_win(tmp_path):
    root = fake_root(tmp_path, {"etc/apt/sources.list.d/debian.sources": DEB822})
    env = {"ARMVM_MIRROR": "http://env.example.test/debian/"}
    assert find_mirror(root=root, environ=env) == "http://env.example.test/debian"
    assert find_mirror("https://cli.example.test/d/", root=root, environ=env) == \
        "https://cli.example.test/d"
    with pytest.raises(ArmvmError, match="--mirror: 'ftp://x/debian' is not an HTTP"):
        find_mirror("ftp://x/debian", root=root, environ=env)


def test_empty_root(tmp_path):
    with pytest.raises(ArmvmError, match="no Debian mirror found"):
        find_mirror(root=tmp_path, environ={})
