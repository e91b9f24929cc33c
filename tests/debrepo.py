"""A tiny signed Debian repository for tests, built in pure Python and served on 127.0.0.1.

``make_deb`` writes .debs (ar + control.tar + data.tar with a chosen compression); the
``debrepo_files`` session fixture builds a repository (pool/, Packages(.xz/.gz) for a few
architectures, Release signed into InRelease with a throwaway gpg key, the public key as
keyring file); the ``debrepo`` fixture serves it on a free port, counting requests and
letting a test replace a path's bytes or answer a status code instead.
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import lzma
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MTIME = 1_700_000_000
SUITE = "testsuite"


def _tar(entries: list[tuple]) -> bytes:
    """entries: (name, kind, payload, mode); kind is file|dir|symlink|hardlink|chardev."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, kind, payload, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uname, info.gname = MTIME, mode, "root", "root"
            data = None
            if kind == "file":
                data = payload if isinstance(payload, bytes) else payload.encode()
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "chardev":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".xz":
        return lzma.compress(data)
    if suffix == ".gz":
        return gzip.compress(data, mtime=0)
    if suffix == ".bz2":
        import bz2
        return bz2.compress(data)
    if suffix == ".zst":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    if suffix == ".lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE)
    return data


def ar_archive(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members:
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}`\n".encode())
        out.append(data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def make_deb(path: Path, control: dict, entries: list[tuple], *, data: str = ".xz",
             control_compression: str = ".xz") -> bytes:
    text = "".join(f"{k}: {v}\n" for k, v in control.items())
    control_tar = _tar([("./", "dir", None, 0o755), ("./control", "file", text, 0o644)])
    blob = ar_archive([("debian-binary", b"2.0\n"),
                       ("control.tar" + control_compression,
                        compress(control_tar, control_compression)),
                       ("data.tar" + data, compress(_tar(entries), data))])
    Path(path).write_bytes(blob)
    return blob


def kernel_entries(version: str) -> list[tuple]:
    return [("./", "dir", None, 0o755), ("./boot/", "dir", None, 0o755),
            (f"./boot/vmlinuz-{version}", "file", b"MZ fake kernel " * 64, 0o644),
            (f"./boot/config-{version}", "file", "CONFIG_ARM64=y\n", 0o644),
            ("./usr/", "dir", None, 0o755), ("./usr/lib/", "dir", None, 0o755),
            ("./usr/lib/modules/", "dir", None, 0o755),
            (f"./usr/lib/modules/{version}/", "dir", None, 0o755),
            (f"./usr/lib/modules/{version}/modules.builtin", "file", "kernel/a.ko\n", 0o644),
            (f"./usr/lib/modules/{version}/modules.order", "hardlink",
             f"./usr/lib/modules/{version}/modules.builtin", 0o644),
            (f"./usr/lib/modules/{version}/config", "symlink",
             f"../../../../boot/config-{version}", 0o777),
            ("./dev-null", "chardev", None, 0o666)]


_ROOT = ("./", "dir", None, 0o755)
# (name, architecture, data compression, depends, entries, extra control fields)
PACKAGES = [
    ("linux-image-9.9.9-test-arm64", "arm64", ".xz", "kmod",
     kernel_entries("9.9.9-test-arm64"), {}),
    ("linux-image-test-arm64", "arm64", ".xz", "linux-image-9.9.9-test-arm64 (= 9.9.9-1)",
     [_ROOT], {}),
    ("busybox-static", "arm64", ".zst", "",
     [_ROOT, ("./usr/", "dir", None, 0o755), ("./usr/bin/", "dir", None, 0o755),
      ("./usr/bin/busybox", "file", b"\x7fELF" * 8, 0o4755)],
     {"Provides": "busybox, sh-test (= 1)"}),
    ("busybox-static", "armhf", ".gz", "", [_ROOT, ("./bin/busybox", "file", b"ARM" * 5, 0o755)],
     {}),
    ("evil-traversal", "arm64", ".xz", "", [_ROOT, ("./../escaped", "file", "gotcha\n", 0o644)],
     {}),
    ("lzma-data", "arm64", ".lzma", "", [_ROOT], {}),
    ("amd64-only-tool", "amd64", ".gz", "", [_ROOT], {}),
    ("tzdata-test", "all", ".gz", "", [_ROOT, ("./usr/share/zoneinfo", "file", "UTC\n", 0o644)],
     {}),
]


@dataclass
class RepoFiles:
    root: Path
    keyring: Path
    gnupghome: Path
    debs: dict = field(default_factory=dict)       # (name, arch) -> archive Filename


def gen_key(home: Path) -> Path:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = dict(os.environ, GNUPGHOME=str(home))
    subprocess.run(["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key",
                    "armvm test repo <test@armvm.invalid>", "ed25519", "sign", "never"],
                   env=env, check=True, capture_output=True)
    keyring = home / "test-keyring.gpg"
    keyring.write_bytes(subprocess.run(["gpg", "--batch", "--export"], env=env, check=True,
                                       capture_output=True).stdout)
    return keyring


def sign(home: Path, release: Path, out: Path) -> None:
    env = dict(os.environ, GNUPGHOME=str(home))
    subprocess.run(["gpg", "--batch", "--yes", "--quiet", "--pinentry-mode", "loopback",
                    "--passphrase", "", "--digest-algo", "SHA256", "--clearsign", "-o", str(out),
                    str(release)], env=env, check=True, capture_output=True)


def build_repo(root: Path, home: Path) -> RepoFiles:
    keyring = gen_key(home)
    repo = RepoFiles(root=root, keyring=keyring, gnupghome=home)
    stanzas: dict[str, list[str]] = {"arm64": [], "armhf": [], "amd64": [], "all": []}
    for name, arch, comp, depends, entries, extra in PACKAGES:
        version = "9.9.9-1" if name.startswith("linux-image") else "1.0-1"
        filename = f"pool/main/{name[0]}/{name}/{name}_{version}_{arch}.deb"
        (root / filename).parent.mkdir(parents=True, exist_ok=True)
        control = {"Package": name, "Version": version, "Architecture": arch,
                   "Maintainer": "Test <test@armvm.invalid>", "Installed-Size": "1",
                   **({"Depends": depends} if depends else {}), **extra,
                   "Description": "test package\n a long description line\n ."}
        blob = make_deb(root / filename, control, entries, data=comp)
        fields = dict(control, Filename=filename, Size=str(len(blob)),
                      SHA256=hashlib.sha256(blob).hexdigest())
        stanzas[arch].append("".join(f"{k}: {v}\n" for k, v in fields.items()))
        repo.debs[(name, arch)] = filename
    dists = root / "dists" / SUITE
    listed = []
    for arch, entries in stanzas.items():
        text = "\n".join(entries).encode()
        base = dists / "main" / f"binary-{arch}"
        base.mkdir(parents=True, exist_ok=True)
        suffixes = ["", ".gz"] if arch == "armhf" else ["", ".xz"]   # armhf: .gz fallback
        for suffix in suffixes:
            (base / f"Packages{suffix}").write_bytes(compress(text, suffix))
            listed.append(f"main/binary-{arch}/Packages{suffix}")
    lines = [f" {hashlib.sha256((dists / p).read_bytes()).hexdigest()} "
             f"{(dists / p).stat().st_size:>8} {p}" for p in listed]
    release = (f"Origin: armvm-test\nSuite: armvm-testing\nCodename: {SUITE}\n"
               "Architectures: amd64 arm64 armhf all\nComponents: main\nSHA256:\n"
               + "\n".join(lines) + "\n")
    (dists / "Release").write_text(release)
    sign(home, dists / "Release", dists / "InRelease")
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=dict(os.environ, GNUPGHOME=str(home)),
                   capture_output=True)
    return repo


class RepoServer:
    """Serves ``root`` over HTTP; ``requests`` lists request paths, ``overrides`` maps a path
    to replacement bytes or an HTTP status (int), ``fail_first`` to a number of 503s."""

    def __init__(self, files: RepoFiles):
        self.files, self.requests, self.overrides, self.fail_first = files, [], {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = self.path.split("?", 1)[0]
                server.requests.append(path)
                if server.fail_first.get(path, 0) > 0:
                    server.fail_first[path] -= 1
                    return self._send(503, b"busy")
                override = server.overrides.get(path)
                if isinstance(override, int):
                    return self._send(override, b"")
                if override is not None:
                    return self._send(200, override)
                local = (files.root / path.lstrip("/")).resolve()
                if files.root.resolve() not in local.parents or not local.is_file():
                    return self._send(404, b"not found")
                self._send(200, local.read_bytes())

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def deb_url_path(self, name: str, arch: str = "arm64") -> str:
        return "/" + self.files.debs[(name, arch)]

    def count(self, suffix: str) -> int:
        return sum(1 for r in self.requests if r.endswith(suffix))

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def debrepo_files():
    tmp = Path(tempfile.mkdtemp(prefix="armvm-debrepo-"))
    try:
        yield build_repo(tmp / "repo", tmp / "g")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def debrepo(debrepo_files):
    server = RepoServer(debrepo_files)
    try:
        yield server
    finally:
        server.close()
