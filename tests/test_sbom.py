"""SBOMs (issue 14 item 2): SPDX 2.3 and CycloneDX 1.5 JSON derived from the manifest,
validated by the reference libraries (spdx-tools, cyclonedx-python-lib), reproducible, with
the Debian packages' purls and DEP-5 licenses and the containment relationships."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from builder.build import BuildOptions, build
from builder.publish import sbom
from tests.fixtures import efi_recipe

ENV = {"SOURCE_DATE_EPOCH": "1700000000"}

# the shape of a real Debian build's manifest (debian-arm64 recipe), trimmed
DEB_MANIFEST = {
    "tool": {"name": "armvm-build", "version": "0.1.0"},
    "recipe": {"name": "debian-arm64", "digest": "ab" * 32, "arch": "aarch64", "file": "debian-arm64.yaml"},
    "source_date_epoch": 1700000000, "seed": "s",
    "inputs": [
        {"filename": "pool/main/g/grub2/grub-efi-arm64-bin_2.12-9+deb13u4_arm64.deb",
         "origin": "debian:grub-efi-arm64-bin=2.12-9+deb13u4", "role": "bootloader",
         "sha256": "d2" * 32, "size": 945068, "license": "GPL-3+"},
        {"filename": "pool/main/b/busybox/busybox-static_1.37.0-6+b9_arm64.deb",
         "origin": "debian:busybox-static=1:1.37.0-6+b9", "role": "busybox", "sha256": "c8" * 32, "size": 847552},
        {"filename": "pool/main/l/linux-signed-arm64/linux-image-6.12.117+deb13-cloud-arm64_6.12.117-1_arm64.deb",
         "origin": "debian:linux-image-6.12.117+deb13-cloud-arm64=6.12.117-1", "role": "kernel",
         "sha256": "cc" * 32, "size": 28391960, "license": "GPL-2"},
        {"origin": "https://example.org/tool.efi", "role": "esp.files[0]", "sha256": "ee" * 32, "size": 10},
        {"origin": "file:files/notes.txt", "role": "esp.files[1]", "sha256": "ff" * 32, "size": 5},
    ],
    "initramfs": {"modules": ["virtio_blk", "virtio_pci", "virtio_mmio"]},
    "layout": {"disk_bytes": 536870912, "disk_guid": "F968701C-6816-5148-A97A-968BD8D896D3", "sector_size": 512,
               "partitions": [{"number": 1, "kind": "esp", "name": "ESP", "offset": 1048576, "size": 268435456,
                               "filesystem": "fat32", "type_guid": "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
                               "unique_guid": "0E40255F-353F-57F6-B706-34A1B6845948",
                               "files": [{"dest": "EFI/BOOT/BOOTAA64.EFI", "role": "loader", "sha256": "e6" * 32, "size": 643072},
                                         {"dest": "initrd.img", "role": "initrd", "sha256": "47" * 32, "size": 1196578},
                                         {"dest": "vmlinuz", "role": "kernel", "sha256": "be" * 32, "size": 30894016}]}]},
}


def validate_spdx(path: Path) -> dict:
    from spdx_tools.spdx.parser.parse_anything import parse_file
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document
    messages = validate_full_spdx_document(parse_file(str(path)))
    assert messages == [], [m.validation_message for m in messages]
    return json.loads(path.read_text())


def validate_cdx(path: Path) -> dict:
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(path.read_text())
    assert error is None, error
    return json.loads(path.read_text())


def _write(tmp_path, kind):
    suffix, make = sbom.SBOM_FILES[kind]
    p = tmp_path / f"x.{suffix}"
    p.write_text(json.dumps(make(DEB_MANIFEST)))
    return p


def test_spdx_debian_packages_purls_licenses_relationships(tmp_path):
    doc = validate_spdx(_write(tmp_path, "spdx"))
    assert doc["spdxVersion"] == "SPDX-2.3"
    pk = {p["name"]: p for p in doc["packages"]}
    grub = pk["grub-efi-arm64-bin"]
    assert grub["versionInfo"] == "2.12-9+deb13u4" and grub["licenseDeclared"] == "GPL-3.0-or-later"
    assert grub["checksums"] == [{"algorithm": "SHA256", "checksumValue": "d2" * 32}]
    assert grub["externalRefs"][0]["referenceLocator"] == "pkg:deb/debian/grub-efi-arm64-bin@2.12-9%2Bdeb13u4?arch=arm64"
    assert pk["busybox-static"]["licenseDeclared"] == "NOASSERTION"          # not DEP-5
    from packageurl import PackageURL                # the reference purl library (cyclonedx's)
    for p in doc["packages"]:
        for ref in p.get("externalRefs", []):
            assert PackageURL.from_string(ref["referenceLocator"]).to_string() == ref["referenceLocator"]
    busybox = PackageURL.from_string(pk["busybox-static"]["externalRefs"][0]["referenceLocator"])
    assert (busybox.name, busybox.version, busybox.qualifiers) == ("busybox-static", "1:1.37.0-6+b9", {"arch": "arm64"})
    assert pk["https://example.org/tool.efi"]["downloadLocation"] == "https://example.org/tool.efi"
    assert "file:files/notes.txt" in pk
    ids = {p["name"]: p["SPDXID"] for p in doc["packages"]}
    rel = {(r["spdxElementId"], r["relationshipType"], r["relatedSpdxElement"]) for r in doc["relationships"]}
    assert ("SPDXRef-DOCUMENT", "DESCRIBES", ids["debian-arm64.raw"]) in rel
    assert (ids["debian-arm64.raw"], "CONTAINS", ids["ESP"]) in rel
    for f in ("EFI/BOOT/BOOTAA64.EFI", "vmlinuz", "initrd.img"):
        assert (ids["ESP"], "CONTAINS", ids[f]) in rel, f
    for m in ("virtio_blk", "virtio_pci", "virtio_mmio"):
        assert (ids["initrd.img"], "CONTAINS", ids[f"{m}.ko"]) in rel, m
    assert (ids["vmlinuz"], "GENERATED_FROM", ids["linux-image-6.12.117+deb13-cloud-arm64"]) in rel


def test_cyclonedx_validates_and_nests_esp_files_and_modules(tmp_path):
    doc = validate_cdx(_write(tmp_path, "cyclonedx"))
    assert doc["specVersion"] == "1.5"
    comps = {c["name"]: c for c in doc["components"]}
    k = comps["linux-image-6.12.117+deb13-cloud-arm64"]
    assert k["purl"] == "pkg:deb/debian/linux-image-6.12.117%2Bdeb13-cloud-arm64@6.12.117-1?arch=arm64"
    assert k["licenses"] == [{"expression": "GPL-2.0-only"}]
    assert k["hashes"] == [{"alg": "SHA-256", "content": "cc" * 32}]
    image = doc["metadata"]["component"]
    esp = image["components"][0]
    assert esp["name"] == "ESP"
    files = {c["name"]: c for c in esp["components"]}
    assert set(files) == {"EFI/BOOT/BOOTAA64.EFI", "vmlinuz", "initrd.img"}
    assert [c["name"] for c in files["initrd.img"]["components"]] == ["virtio_blk.ko", "virtio_pci.ko", "virtio_mmio.ko"]


def test_root_partition_contains_the_pinned_root_packages(tmp_path):
    m = json.loads(json.dumps(DEB_MANIFEST))
    m["inputs"].append({"filename": "pool/main/s/systemd/systemd_257.9-1_arm64.deb", "origin": "debian:systemd=257.9-1",
                        "role": "rootfs.debian", "sha256": "5e" * 32, "size": 1})
    m["layout"]["partitions"].append({"number": 2, "kind": "root", "name": "ROOT", "offset": 269484032,
                                      "size": 267386880, "filesystem": "ext4",
                                      "type_guid": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
                                      "unique_guid": "11111111-2222-5333-8444-555555555555", "files": []})
    for kind in ("spdx", "cyclonedx"):
        suffix, make = sbom.SBOM_FILES[kind]
        (tmp_path / f"r.{suffix}").write_text(json.dumps(make(m)))
    doc = validate_spdx(tmp_path / "r.spdx.json")
    ids = {p["name"]: p["SPDXID"] for p in doc["packages"]}
    assert {"spdxElementId": ids["ROOT"], "relationshipType": "CONTAINS",
            "relatedSpdxElement": ids["systemd"]} in doc["relationships"]
    cdx = validate_cdx(tmp_path / "r.cdx.json")
    assert {"ref": "partition:2", "dependsOn": ["pkg:deb/debian/systemd@257.9-1?arch=arm64"]} in cdx["dependencies"]


def test_license_reader_takes_dep5_only(tmp_path):
    doc = tmp_path / "usr/share/doc"
    (doc / "good").mkdir(parents=True)
    (doc / "good/copyright").write_text(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n"
        "Upstream-Name: good\n\nFiles: *\nCopyright: 2020 Someone\nLicense: GPL-2+\n\n"
        "Files: lib/*\nCopyright: 2021 Other\nLicense: Expat\n\nLicense: GPL-2+\n text\n\nLicense: Expat\n text\n")
    (doc / "old").mkdir()
    (doc / "old/copyright").write_text("This package was debianized by someone.\nGPL.\n")
    (doc / "link").mkdir()
    (doc / "link/copyright").symlink_to(doc / "good/copyright")
    assert sbom.copyright_license(tmp_path, "good") == "GPL-2+"
    assert sbom.copyright_license(tmp_path, "old") is None
    assert sbom.copyright_license(tmp_path, "link") is None           # no symlink followed
    assert sbom.copyright_license(tmp_path, "missing") is None
    assert sbom.spdx_expression("GPL-2+ or Expat") == ("GPL-2.0-or-later OR MIT", [])
    expr, refs = sbom.spdx_expression("public-domain")
    assert expr == "LicenseRef-public-domain" and refs == [expr]


def test_build_writes_both_sboms_reproducibly_and_valid(tmp_path):
    recipe = efi_recipe(tmp_path, extra_files="output: {sbom: [spdx, cyclonedx]}\n")
    outs = []
    for n in (1, 2):
        res = build(recipe, BuildOptions(output_dir=tmp_path / f"o{n}", cache_dir=tmp_path / f"c{n}",
                                         progress=False, environ=ENV))
        assert res.ok, res.message
        outs.append(tmp_path / f"o{n}")
    for name in ("demo.spdx.json", "demo.cdx.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    spdx = validate_spdx(outs[0] / "demo.spdx.json")
    validate_cdx(outs[0] / "demo.cdx.json")
    names = {p["name"] for p in spdx["packages"]}
    assert {"file:files/loader.efi", "file:files/vmlinuz", "EFI/BOOT/BOOTAA64.EFI", "ESP", "demo.raw"} <= names


def test_single_name_form_and_bad_kind(tmp_path):
    from builder.errors import RecipeError
    recipe = efi_recipe(tmp_path, extra_files="output: {sbom: cyclonedx}\n")
    res = build(recipe, BuildOptions(output_dir=tmp_path / "o", cache_dir=tmp_path / "c", progress=False, environ=ENV))
    assert res.ok and (tmp_path / "o/demo.cdx.json").is_file() and not (tmp_path / "o/demo.spdx.json").exists()
    recipe.write_text(recipe.read_text().replace("sbom: cyclonedx", "sbom: [swid]"))
    with pytest.raises(RecipeError) as err:
        build(recipe, BuildOptions(output_dir=tmp_path / "o", cache_dir=tmp_path / "c", progress=False, environ=ENV))
    assert "output.sbom[0]" in str(err.value) and "spdx, cyclonedx" in str(err.value)


DEP5 = ("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 2020 Someone\nLicense: {lic}\n\nLicense: {lic}\n text\n")


def _root_tar(tmp_path, members):
    """A root tarball like mmdebstrap's (./-prefixed names) from (name, kind, data) rows."""
    import io
    import tarfile
    path = tmp_path / "root.tar"
    with tarfile.open(path, "w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo("./" + name)
            if kind == "file":
                blob = data.encode()
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
    return path


def test_root_tarball_licenses_dep5_bounded_links_one_step(tmp_path, monkeypatch):
    doc = "usr/share/doc/"
    tar = _root_tar(tmp_path, [
        (doc, "dir", ""), (doc + "good", "dir", ""), (doc + "good/copyright", "file", DEP5.format(lic="GPL-2+")),
        (doc + "good-dev", "link", "good"),                       # Debian's doc-folder symlink: followed
        (doc + "old/copyright", "file", "This package was debianized by someone.\nGPL.\n"),
        (doc + "sly/copyright", "link", "../good/copyright"),    # a symlinked file: not followed
        (doc + "out", "link", "../../../etc"),                   # out of usr/share/doc: not followed
        (doc + "big/copyright", "file", DEP5.format(lic="Expat") + "#" * 300),
        (doc + "other/copyright", "file", DEP5.format(lic="MIT")),   # not asked for
    ])
    monkeypatch.setattr(sbom, "COPYRIGHT_MAX", len(DEP5.format(lic="Expat")) + 100)
    got = sbom.tar_licenses(tar, ["good", "good-dev", "old", "sly", "out", "big", "missing"])
    assert got == {"good": "GPL-2+", "good-dev": "GPL-2+"}
    assert sbom.tar_licenses(tmp_path / "nope.tar", ["good"]) == {}      # unreadable: no claim
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    assert sbom.tar_licenses(tmp_path / "bad.tar", ["good"]) == {}


@pytest.mark.network
def test_root_tarball_license_of_a_real_debian_package(pytestconfig, tmp_path):
    """The copyright file of a real package (base-files, DEP-5 since long), in a tarball
    laid out as mmdebstrap writes it."""
    import tarfile
    from tests.fixtures import debian_tree
    tree = debian_tree(pytestconfig, "trixie", "arm64", "base-files")
    with tarfile.open(tmp_path / "root.tar", "w") as tar:
        tar.add(tree / "usr" / "share" / "doc" / "base-files", arcname="./usr/share/doc/base-files")
    got = sbom.tar_licenses(tmp_path / "root.tar", ["base-files"])
    assert got == {"base-files": sbom.copyright_license(tree, "base-files")} and got["base-files"]


def test_root_package_license_reaches_both_sboms(tmp_path):
    m = json.loads(json.dumps(DEB_MANIFEST))
    m["inputs"].append({"filename": "pool/main/b/bash/bash_5.2.37-2_arm64.deb", "origin": "debian:bash=5.2.37-2",
                        "role": "rootfs.debian", "sha256": "5e" * 32, "size": 1, "license": "GPL-3+"})
    for kind in ("spdx", "cyclonedx"):
        suffix, make = sbom.SBOM_FILES[kind]
        (tmp_path / f"r.{suffix}").write_text(json.dumps(make(m)))
    doc = validate_spdx(tmp_path / "r.spdx.json")
    bash = next(p for p in doc["packages"] if p["name"] == "bash")
    assert bash["licenseDeclared"] == "GPL-3.0-or-later"
    cdx = validate_cdx(tmp_path / "r.cdx.json")
    comp = next(c for c in cdx["components"] if c["name"] == "bash")
    assert comp["licenses"] == [{"expression": "GPL-3.0-or-later"}]
