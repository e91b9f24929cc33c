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
    for name, hint in (("demo.qcow2", "qemu-img convert -O raw demo.qcow2 demo.raw"),
                       ("demo.raw.zst", "zstd -d demo.raw.zst"), ("demo.raw.xz", "xz -dk demo.raw.xz")):
        for command in ("verify", "boot"):          # refused before anything boots
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
