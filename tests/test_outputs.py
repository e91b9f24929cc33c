"""Image formats beyond the raw (issue 14 item 1), judged by external tools: qemu-img check,
info and compare for qcow2; xz / zstd and `bmaptool copy` (which decompresses on the fly,
checked against the .bmap) for the compressed raws; everything byte-identical across two
builds; the --format option; the container hint of verify/boot naming our own outputs."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from builder.build import BuildOptions, build
from builder.publish import formats
from tests.fixtures import efi_recipe

ENV = {"SOURCE_DATE_EPOCH": "1700000000"}
ALL = "output: {formats: [raw, qcow2, raw.zst, raw.xz], sbom: [spdx, cyclonedx]}\n"


def _build(tmp_path, out="out", cache="cache", extra=ALL, **kw):
    recipe = efi_recipe(tmp_path, extra_files=extra)
    res = build(recipe, BuildOptions(output_dir=tmp_path / out, cache_dir=tmp_path / cache, progress=False,
                                     environ=ENV, checksum=True, **kw))
    assert res.ok, res.message
    return res


def run(*argv):
    out = subprocess.run(list(argv), capture_output=True, text=True)
    assert out.returncode == 0, (argv, out.stdout, out.stderr)
    return out.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    return _build(tmp), tmp


def test_every_format_published_and_listed(built):
    res, tmp = built
    out = tmp / "out"
    names = {p.name for p in res.outputs}
    for n in ("demo.raw", "demo.qcow2", "demo.raw.zst", "demo.raw.xz", "demo.spdx.json", "demo.cdx.json",
              "demo.report.html", "demo.bmap", "demo.manifest.json"):
        assert n in names and (out / n).is_file(), n
    manifest = json.loads((out / "demo.manifest.json").read_text())
    assert manifest["outputs"] == {"images": ["demo.raw", "demo.qcow2", "demo.raw.zst", "demo.raw.xz"],
                                   "sbom": ["demo.spdx.json", "demo.cdx.json"], "report": "demo.report.html"}
    assert set(res.to_json()["outputs"]) >= {str(out / n) for n in manifest["outputs"]["images"]}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]      # no temp left


def test_every_published_file_has_its_sha256_in_the_result_and_sha256_files(built):
    res, tmp = built
    out = tmp / "out"
    digests = res.to_json()["sha256"]
    assert set(digests) == {p.name for p in res.outputs}        # every output, raw included (--checksum)
    for p in res.outputs:
        assert digests[p.name] == hashlib.sha256(p.read_bytes()).hexdigest(), p.name
    for name in ("demo.raw", "demo.qcow2", "demo.raw.zst", "demo.raw.xz"):
        side = out / f"{name}.sha256"                              # sha256sum -c format
        assert side.read_text() == f"{digests[name]}  {name}\n"
        proc = subprocess.run(["sha256sum", "--check", "--strict", side.name], cwd=out,
                              capture_output=True, text=True)
        assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_qcow2_is_v3_clean_identical_and_sparse(built):
    res, tmp = built
    raw, qcow = tmp / "out" / "demo.raw", tmp / "out" / "demo.qcow2"
    info = json.loads(run("qemu-img", "info", "--output=json", "-f", "qcow2", str(qcow)))
    assert info["format"] == "qcow2" and info["virtual-size"] == raw.stat().st_size
    assert info["format-specific"]["data"]["compat"] == "1.1"
    assert info["cluster-size"] == 65536
    check = json.loads(run("qemu-img", "check", "--output=json", "-f", "qcow2", str(qcow)))
    assert check.get("corruptions", 0) == 0 and check.get("leaks", 0) == 0 and check["check-errors"] == 0
    assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow))
    # only allocated clusters: as many as qemu-img's own conversion allocates, and the
    # file is no bigger than the raw's data plus metadata
    peer = tmp / "peer.qcow2"
    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", "compat=1.1", str(raw), str(peer))
    ours = json.loads(run("qemu-img", "check", "--output=json", str(qcow)))
    theirs = json.loads(run("qemu-img", "check", "--output=json", str(peer)))
    assert ours["allocated-clusters"] == theirs["allocated-clusters"]
    assert qcow.stat().st_size <= raw.stat().st_blocks * 512 + 8 * 65536


def test_compressed_raws_decompress_and_bmaptool_copies_them(built):
    res, tmp = built
    out = tmp / "out"
    digest = hashlib.sha256((out / "demo.raw").read_bytes()).hexdigest()
    for name, tool in (("demo.raw.zst", ["zstd", "-dc"]), ("demo.raw.xz", ["xz", "-dc"])):
        data = subprocess.run(tool + [str(out / name)], capture_output=True, check=True).stdout
        assert hashlib.sha256(data).hexdigest() == digest, name
        copy = tmp / f"copy-{name}.raw"
        run("bmaptool", "copy", "--bmap", str(out / "demo.bmap"), str(out / name), str(copy))
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == digest, name
        assert os.stat(copy).st_blocks * 512 < 64 << 20                      # holes kept


def test_two_builds_byte_identical(built, tmp_path):
    res, tmp = built
    again = _build(tmp_path, out="b", cache="c2")
    for p in res.outputs:
        if p.name.endswith(".verify.json"):
            continue                   # names the temporary image path (not ours to change)
        assert (tmp_path / "b" / p.name).read_bytes() == p.read_bytes(), p.name


def test_writers_do_not_depend_on_threads_and_skip_holes(tmp_path):
    raw = tmp_path / "d.raw"
    with open(raw, "wb") as f:
        f.truncate(80 << 20)
        for off in (0, 3 << 20, 50 << 20):
            f.seek(off)
            f.write(os.urandom(100_000) + b"x" * 200_000)
    outs = {}
    for threads in (1, 2):
        for fmt, writer in (("xz", formats.write_xz), ("zst", formats.write_zstd)):
            dest = tmp_path / f"o{threads}.{fmt}"
            dest.touch()
            writer(raw, dest, threads=threads)
            outs[(fmt, threads)] = dest.read_bytes()
    assert outs[("xz", 1)] == outs[("xz", 2)] and outs[("zst", 1)] == outs[("zst", 2)]
    import lzma
    import zstandard
    assert lzma.decompress(outs[("xz", 1)]) == raw.read_bytes()
    assert zstandard.ZstdDecompressor().decompress(outs[("zst", 1)]) == raw.read_bytes()
    q = tmp_path / "d.qcow2"
    q.touch()
    formats.write_qcow2(raw, q)
    assert "Images are identical" in run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(q))
    check = json.loads(run("qemu-img", "check", "--output=json", str(q)))
    assert check["check-errors"] == 0 and not check.get("leaks") and not check.get("corruptions")
    assert check["allocated-clusters"] == 3 * 5          # 300 kB at 0, 3 MiB, 50 MiB: 5 clusters each


def test_format_option_only_publishes_what_is_asked(tmp_path):
    recipe = efi_recipe(tmp_path)
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "builder", "build", str(recipe), "-o", str(out), "-q", "--json"]
    env = {**os.environ, **ENV, "ARMVM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(cli + ["--format", "qcow2,raw.zst"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["image"] == str(out / "demo.qcow2")
    names = sorted(p.name for p in out.iterdir())
    assert "demo.raw" not in names and "demo.qcow2" in names and "demo.raw.zst" in names
    assert "demo.raw.xz" not in names
    bad = subprocess.run(cli + ["--format", "vmdk"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "vmdk" in bad.stderr and "qcow2" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_bad_format_in_recipe_is_a_clear_error(tmp_path):
    from builder.errors import RecipeError
    recipe = efi_recipe(tmp_path, extra_files="output:\n  formats: [raw, vhd]\n")
    with pytest.raises(RecipeError) as err:
        build(recipe, BuildOptions(output_dir=tmp_path / "out", cache_dir=tmp_path / "c", progress=False,
                                   environ=ENV))
    text = str(err.value)
    assert "demo.yaml:16:" in text and "output.formats[1]" in text and "qcow2" in text


def test_formats_never_follow_a_planted_symlink(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    for n in ("demo.qcow2", "demo.raw.zst", "demo.raw.xz", "demo.report.html", "demo.spdx.json"):
        (out / n).symlink_to(victim)
    _build(tmp_path)
    assert victim.read_text() == "precious"
    assert not any(p.is_symlink() for p in out.iterdir())


def test_verify_and_boot_name_our_own_outputs_in_the_hint(built):
    res, tmp = built
    out = tmp / "out"
    for name, hint, commands in (("demo.qcow2", "qemu-img convert -O raw demo.qcow2 demo.raw", ("verify",)),
                                 ("demo.raw.zst", "zstd -d demo.raw.zst", ("verify", "boot")),
                                 ("demo.raw.xz", "xz -dk demo.raw.xz", ("verify", "boot"))):
        for command in commands:          # refused before anything boots (boot takes our qcow2)
            proc = subprocess.run([sys.executable, "-m", "builder", command, name, "-q"][:6 if command == "boot" else 5],
                                  capture_output=True, text=True, cwd=out)
            assert proc.returncode == 3, (command, proc.stderr)
            assert hint in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr


def test_a_failing_format_leaves_the_earlier_good_outputs_untouched(tmp_path, monkeypatch):
    from builder.errors import ArmvmError
    _build(tmp_path)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(raw, dest, **kw):
        dest.write_bytes(b"half")
        raise OSError(28, "No space left on device", str(dest))
    monkeypatch.setitem(formats.WRITERS, "raw.xz", broken)
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(recipe.read_text() + "seed: another\n")          # other GUIDs: other bytes
    with pytest.raises(ArmvmError) as err:
        build(recipe, BuildOptions(output_dir=out, cache_dir=tmp_path / "cache", progress=False, environ=ENV))
    assert str(out) in str(err.value) and "No space left" in str(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before      # nothing new, nothing half-written


def _fake_qemu(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    import fakeqemu
    from tests.test_boot_ui import DONE, FIRMWARE, KERNEL
    bindir, rec, plan = tmp_path / "bin", tmp_path / "rec", tmp_path / "plan.json"
    rec.mkdir()
    plan.write_text(json.dumps([{"out": FIRMWARE}, {"out": KERNEL}, {"out": DONE}, {"exit": 0}]))
    fakeqemu.install(bindir, plan, rec)
    (tmp_path / "CODE.fd").write_bytes(b"code")
    (tmp_path / "VARS.fd").write_bytes(b"vars")
    env = dict(os.environ, ARMVM_FIRMWARE_CODE=str(tmp_path / "CODE.fd"),
               ARMVM_FIRMWARE_VARS=str(tmp_path / "VARS.fd"), PATH=f"{bindir}:{os.environ['PATH']}")
    return env, rec


def test_boot_hands_our_qcow2_to_qemu_as_qcow2(built, tmp_path):
    import shutil
    res, tmp = built
    img = tmp_path / "img"
    img.mkdir()
    for n in ("demo.qcow2", "demo.manifest.json", "demo.verify.json"):
        shutil.copyfile(tmp / "out" / n, img / n)
    qcow = img / "demo.qcow2"
    env, rec = _fake_qemu(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "builder", "boot", str(qcow), "--json", "--timeout", "60",
                           "--report"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["report"] == str(img / "demo.report.html")     # the build's name
    assert 'id="timeline-table"' in (img / "demo.report.html").read_text()
    args = (rec / "args").read_text().splitlines()
    drives = [args[i + 1] for i, a in enumerate(args) if a == "-drive" and "id=disk0" in args[i + 1]]
    assert drives == [f"if=none,id=disk0,format=qcow2,file={qcow},snapshot=on"]
    # the probe read the guest bytes through the qcow2 tables: the loader's arch was found
    from builder.run.qemu import probe_image
    info = probe_image(qcow)
    assert (info.format, info.arch, info.sector_size) == ("qcow2", "aarch64", 512)
    assert probe_image(tmp / "out" / "demo.raw").format == "raw"


def test_boot_refuses_a_qcow2_with_a_backing_file_before_qemu_runs(built, tmp_path):
    res, tmp = built
    over = tmp_path / "over.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(tmp / "out" / "demo.qcow2"), "-F", "qcow2", str(over))
    env, rec = _fake_qemu(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "builder", "boot", str(over), "--arch", "aarch64"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "backing file" in proc.stderr and "qemu-img convert -O raw" in proc.stderr
    assert "Traceback" not in proc.stderr and not (rec / "args").exists()


def test_qcow2_reader_gives_the_guest_bytes(tmp_path):
    from builder.run.qcow2 import Qcow2Blob
    raw = tmp_path / "d.raw"
    with open(raw, "wb") as f:
        f.truncate(300 << 20)
        for off in (0, 70_000, 3 << 20, 200 << 20):
            f.seek(off)
            f.write(os.urandom(150_000))
    data = raw.read_bytes()
    for writer in (formats.write_qcow2, formats.convert_qcow2):       # ours and qemu-img's
        q = tmp_path / f"{writer.__name__}.qcow2"
        q.touch()
        writer(raw, q)
        with open(q, "rb") as f:
            blob = Qcow2Blob(f, str(q))
            assert blob.size == len(data)
            for off, n in ((0, 300_000), (65_000, 10_000), ((3 << 20) - 5, 200_000), (100 << 20, 4096),
                           ((300 << 20) - 100, 4096)):
                assert blob.read_at(off, n) == data[off:off + n], (writer.__name__, off)


@pytest.mark.boot
@pytest.mark.network
def test_default_image_boots_as_qcow2(tmp_path):
    """The default probe image (recipes/debian-arm64.yaml) published as qcow2 only boots
    under the real QEMU + AAVMF to its marker."""
    import shutil
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(root, "recipes", "debian-arm64.yaml"), tmp_path / "debian-arm64.yaml")
    env = {**os.environ, **ENV}
    b = subprocess.run([sys.executable, "-m", "builder", "build", "-q", str(tmp_path / "debian-arm64.yaml"),
                        "-o", str(tmp_path / "out"), "--format", "qcow2"], capture_output=True, text=True, env=env)
    assert b.returncode == 0, b.stderr[-2000:]
    qcow = tmp_path / "out" / "debian-arm64.qcow2"
    assert not (tmp_path / "out" / "debian-arm64.raw").exists()
    proc = subprocess.run([sys.executable, "-m", "builder", "boot", str(qcow), "--json", "--timeout", "240"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["ok"] and "marker" in out["events"]
    assert any(a.startswith("if=none,id=disk0,format=qcow2,") for a in out["command"]), out["command"]
