"""The root's package set, and a local repository of exactly the pinned .debs for mmdebstrap.

`packages_in_tar` reads what mmdebstrap installed (the tarball's var/lib/dpkg/status).
`write_repo` puts verified .deb files into a flat repository (`deb [trusted=yes] file:DIR ./`)
with a Packages index written from each .deb's own control file plus Filename, Size and
SHA256, and an unsigned Release listing it. `[trusted=yes]` and no signature: every .deb was
checked against the lock's sha256 (itself taken from a gpgv-verified InRelease -> Packages)
before it entered the folder, and the folder is written by this build alone; signing it with a
throwaway key would only make apt re-check what we just wrote.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from pathlib import Path
from typing import Iterable

from builder.errors import ArmvmError

MAX_STATUS = 64 * 1024 * 1024
# Fields of a Packages stanza, in the archive's order (the rest of the control file follows).
_FIRST = ("Package", "Version", "Architecture")


def parse_status(text: str) -> list:
    """(name, version, architecture) of every installed package of a dpkg status file."""
    out = []
    for para in text.split("\n\n"):
        fields = {}
        for line in para.splitlines():
            if line and not line[0].isspace() and ":" in line:
                k, v = line.split(":", 1)
                fields[k] = v.strip()
        if fields.get("Package") and fields.get("Status", "").endswith(" installed"):
            out.append((fields["Package"], fields.get("Version", ""), fields.get("Architecture", "")))
    return sorted(out)


def packages_in_tar(tar_path: Path) -> list:
    """(name, version, architecture) installed in a root tarball (its var/lib/dpkg/status)."""
    try:
        with tarfile.open(tar_path) as tar:
            for info in tar:
                if info.name.lstrip("./") == "var/lib/dpkg/status" and info.isreg():
                    if info.size > MAX_STATUS:
                        raise ArmvmError(f"{tar_path}: var/lib/dpkg/status is larger than {MAX_STATUS} bytes")
                    data = tar.extractfile(info).read()          # type: ignore[union-attr]
                    return parse_status(data.decode("utf-8", "replace"))
    except (tarfile.TarError, OSError) as exc:
        raise ArmvmError(f"{tar_path}: cannot read the root tarball: {exc}") from None
    return []


def _stanza(control: dict, filename: str, size: int, sha256: str) -> str:
    fields = dict(control)
    for k in ("Filename", "Size", "SHA256", "MD5sum", "SHA1"):
        fields.pop(k, None)
    order = [k for k in _FIRST if k in fields] + [k for k in fields if k not in _FIRST]
    lines = []
    for k in order:
        value = str(fields[k]).strip("\n")
        if "\n" in value:
            head, *rest = value.split("\n")
            value = "\n".join([head] + [(" " + r.strip()) if r.strip() else " ." for r in rest])
        lines.append(f"{k}: {value}")
    lines += [f"Filename: ./{filename}", f"Size: {size}", f"SHA256: {sha256}"]
    return "\n".join(lines) + "\n"


def write_repo(repo: Path, debs: Iterable[tuple], suite: str, arch: str) -> None:
    """A flat repository in ``repo`` from (name, version, verified .deb path, sha256, size).

    The control file of each .deb must name the pinned package and version: a vendor file
    with the right hash cannot be anything else, but the check costs nothing."""
    from builder.inputs.debian.deb import read_control
    repo.mkdir(mode=0o755)
    os.chmod(repo, 0o755)                    # mmdebstrap's unshare mode reads it as another user
    stanzas = []
    for name, version, path, sha256, size in sorted(debs, key=lambda d: (d[0], d[1])):
        target = repo / f"{name}_{version.replace(':', '%3a')}.deb"
        shutil.copyfile(path, target)        # a copy: the cache's or vendor's file keeps its mode
        os.chmod(target, 0o644)
        control = read_control(target)
        if control.get("Package") != name or control.get("Version") != version:
            raise ArmvmError(f"{path}: its control file names {control.get('Package')} "
                             f"{control.get('Version')}, but the lock pins {name} {version}")
        stanzas.append(_stanza(control, target.name, size, sha256))
    packages = "\n".join(stanzas).encode("utf-8")
    (repo / "Packages").write_bytes(packages)
    digest = hashlib.sha256(packages).hexdigest()
    (repo / "Release").write_text(
        f"Origin: armvm-build\nLabel: pinned root packages\nSuite: {suite}\nCodename: {suite}\n"
        f"Architectures: {arch} all\nSHA256:\n {digest} {len(packages)} Packages\n")
