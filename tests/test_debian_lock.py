"""Lock files: JSON round trip, validation messages naming the file and field."""
from __future__ import annotations

import json

import pytest

from builder.errors import ArmvmError
from builder.inputs.lock import Lock, LockedPackage, lock_to_json, read_lock, write_lock

SHA = "ab" * 32


def sample() -> Lock:
    pkgs = {"busybox-static": LockedPackage("busybox-static", "1:1.37.0-6", "pool/main/b/"
                                            "busybox/busybox-static_1.37.0-6_arm64.deb", SHA,
                                            123, "arm64", ""),
            "linux-image-cloud-arm64": LockedPackage("linux-image-cloud-arm64", "6.12.1-1",
                                                     "pool/main/l/x.deb", "cd" * 32, 9, "arm64",
                                                     "linux-image-6.12.1-cloud-arm64 (= 6.12.1-1)")}
    return Lock(source_date_epoch=1_700_000_000, mirror="http://mirror.invalid/debian",
                snapshot_mirror=None, suite="trixie", packages=pkgs)


def test_round_trip_sorted_and_stable(tmp_path):
    write_lock(tmp_path / "a.lock", sample())
    text = (tmp_path / "a.lock").read_text()
    data = json.loads(text)
    assert list(data) == sorted(data) and data["format"] == 1
    lock = read_lock(tmp_path / "a.lock")
    assert lock == sample() and lock_to_json(lock) == text
    assert not [p for p in tmp_path.iterdir() if p.name != "a.lock"]     # no temp left


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(format=9), "format: 9 is not supported"),
    (lambda d: d.update(source_date_epoch="soon"), "source_date_epoch: 'soon'"),
    (lambda d: d.pop("suite"), "suite: missing"),
    (lambda d: d["packages"]["busybox-static"].update(sha256="xyz"),
     r"packages.busybox-static.sha256: 'xyz' is not a sha256"),
    (lambda d: d["packages"]["busybox-static"].update(size=-1),
     r"packages.busybox-static.size: -1 is not a byte count"),
    (lambda d: d["packages"]["busybox-static"].update(filename="../../etc/passwd"),
     r"packages.busybox-static.filename: '../../etc/passwd' is not a relative archive path"),
    (lambda d: d["packages"]["busybox-static"].pop("version"),
     r"packages.busybox-static.version: missing"),
    (lambda d: d["packages"].update({"Bad Name": {}}), "'Bad Name' is not a Debian package"),
])
def test_bad_lock_names_file_and_field(tmp_path, mutate, message):
    data = json.loads(lock_to_json(sample()))
    mutate(data)
    path = tmp_path / "bad.lock"
    path.write_text(json.dumps(data))
    with pytest.raises(ArmvmError, match=message) as err:
        read_lock(path)
    assert str(path) in str(err.value)


def test_not_json_and_missing(tmp_path):
    (tmp_path / "x.lock").write_text("{nope")
    with pytest.raises(ArmvmError, match="x.lock: not a valid JSON lock file"):
        read_lock(tmp_path / "x.lock")
    with pytest.raises(ArmvmError, match="missing.lock: cannot read lock file"):
        read_lock(tmp_path / "missing.lock")
