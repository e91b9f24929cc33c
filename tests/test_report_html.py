"""<name>.report.html (issue 14 items 3-4): rendered by headless Chromium (Debian's
`chromium`) to a PNG that is not blank and has the asked size, its DOM holding the partition,
file and check names; self-contained (nothing fetched); everything escaped; `boot --report`
adds the timeline and the runtime report (boot against tests/fakeqemu.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from builder.build import BuildOptions, build
from builder.publish import report_html
from tests.fixtures import efi_recipe

sys.path.insert(0, str(Path(__file__).parent))
import fakeqemu  # noqa: E402

ENV = {"SOURCE_DATE_EPOCH": "1700000000"}
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (make system-deps installs it)")
WINDOW = (1100, 1500)


def chromium(tmp_path: Path, page: Path, *mode: str) -> subprocess.CompletedProcess:
    """Headless Chromium as root: no sandbox, a private profile, bounded in time."""
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *mode,
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def png_pixels(path: Path):
    """(width, height, distinct colours among the rows) from a PNG, read with zlib alone."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = bpp = 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = width * bpp + 1
    rows = [raw[i * stride:(i + 1) * stride] for i in range(height)]
    return width, height, len(set(rows))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    recipe = efi_recipe(tmp)
    res = build(recipe, BuildOptions(output_dir=tmp / "out", cache_dir=tmp / "cache", progress=False, environ=ENV))
    assert res.ok, res.message
    return tmp / "out"


def test_report_is_self_contained_and_names_everything(built):
    page = (built / "demo.report.html").read_text()
    manifest = json.loads((built / "demo.manifest.json").read_text())
    verify = json.loads((built / "demo.verify.json").read_text())
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert not re.search(r"url\((?!#)", page)                             # only in-page references
    assert not re.search(r"""(?:src|href)\s*=""", page)                    # nothing to fetch
    assert "default-src 'none'" in page                                   # and the browser is told so
    for p in manifest["layout"]["partitions"]:
        assert p["unique_guid"] in page and p["type_guid"] in page
        for f in p["files"]:
            assert f["dest"] in page and f["sha256"] in page
    for i in manifest["inputs"]:
        assert i["sha256"] in page
    for c in verify["checks"]:
        assert f"<code>{c['id']}</code>" in page
    assert page.count("<svg") == 2                                        # disk + boot chain


@needs_chromium
def test_chromium_renders_the_report(built, tmp_path):
    page = built / "demo.report.html"
    shot = tmp_path / "shot.png"
    chromium(tmp_path, page, f"--screenshot={shot}")
    width, height, distinct_rows = png_pixels(shot)
    assert (width, height) == WINDOW
    assert distinct_rows > 100                        # text, tables and drawings, not a blank page
    dom = chromium(tmp_path, page, "--dump-dom").stdout
    verify = json.loads((built / "demo.verify.json").read_text())
    for name in ("ESP", "EFI/BOOT/BOOTAA64.EFI", "vmlinuz", "firmware", "loader"):
        assert name in dom, name
    for c in verify["checks"]:
        assert c["id"] in dom, c["id"]
    assert dom.count("<svg") == 2 and "<rect" in dom


@needs_chromium
def test_hostile_names_are_escaped(tmp_path):
    manifest = json.loads(json.dumps(__import__("tests.test_sbom", fromlist=["DEB_MANIFEST"]).DEB_MANIFEST))
    evil = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
    manifest["layout"]["partitions"][0]["files"][0]["dest"] = evil
    manifest["layout"]["partitions"][0]["name"] = evil
    manifest["inputs"][3]["origin"] = "https://e.org/" + evil
    verify = {"profile": "p", "exit_code": 0, "summary": {"counts": {"pass": 1}},
              "checks": [{"id": evil, "level": "MUST", "result": "pass", "detail": evil, "requirement": evil}]}
    page = report_html.render(manifest, verify, {"ok": True, "reason": evil, "events": {evil: 1.0},
                                                 "report": [(evil, evil)]})
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page
    path = tmp_path / "evil.html"
    path.write_text(page)
    dom = chromium(tmp_path, path, "--dump-dom").stdout
    assert "<script" not in dom and "<img" not in dom and "pwned" not in dom.split("<title>")[1].split("</title>")[0]


@needs_chromium
def test_boot_report_adds_timeline_and_runtime(built, tmp_path, monkeypatch):
    from tests.test_boot_ui import FIRMWARE, KERNEL, REPORT, DONE
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    for n in ("demo.raw", "demo.manifest.json", "demo.verify.json"):
        shutil.copyfile(built / n, img_dir / n)
    bindir, rec = tmp_path / "bin", tmp_path / "rec"
    rec.mkdir()
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps([{"out": FIRMWARE}, {"sleep": 0.3}, {"out": KERNEL}, {"sleep": 0.2},
                                {"out": REPORT + DONE}, {"exit": 0}]))
    fakeqemu.install(bindir, plan, rec)
    (tmp_path / "CODE.fd").write_bytes(b"code")
    (tmp_path / "VARS.fd").write_bytes(b"vars")
    env = dict(os.environ, ARMVM_FIRMWARE_CODE=str(tmp_path / "CODE.fd"), ARMVM_FIRMWARE_VARS=str(tmp_path / "VARS.fd"),
               PATH=f"{bindir}:{os.environ['PATH']}")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (img_dir / "demo.report.html").symlink_to(victim)
    r = subprocess.run([sys.executable, "-m", "builder", "boot", str(img_dir / "demo.raw"), "--report", "--json"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    page_path = img_dir / "demo.report.html"
    assert out["report"] == str(page_path) and not page_path.is_symlink() and victim.read_text() == "keep"
    page = page_path.read_text()
    assert page.count("<svg") == 3 and 'id="timeline-table"' in page and 'id="runtime-table"' in page
    for milestone in out["events"]:
        assert f"<td>{milestone}</td>" in page
    dom = chromium(tmp_path, page_path, "--dump-dom").stdout
    assert "gic" in dom and "rtc-efi" in dom and "ESP" in dom and "gpt.pmbr" in dom
    shot = tmp_path / "boot.png"
    chromium(tmp_path, page_path, f"--screenshot={shot}")
    assert png_pixels(shot)[2] > 100
