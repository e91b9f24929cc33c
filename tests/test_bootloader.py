"""GRUB loaders (grub-mkimage with trixie's modules, Debian's signed GRUB) and grub.cfg."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from jinja2 import Environment

from builder import spec
from builder.payload import bootloader
from builder.payload.bootloader import build_grub, find_signed_grub, render_grub_cfg
from builder.errors import ArmvmError, MissingToolError
from tests.fixtures import debian_tree

# --- real GRUB modules from the Debian archive (network) --------------------------------



@pytest.fixture(scope="module")
def grub_trees(pytestconfig):
    """Extracted trixie grub-efi-{arm64,arm}-bin trees, cached in pytest's cache dir."""
    return {arch.name: debian_tree(pytestconfig, "trixie", arch.debian_arch,
                                   bootloader.grub_package(arch))
            for arch in spec.ARCHES.values()}


def pe_header(path: Path) -> dict:
    """Independent PE/COFF header reader (PE format spec field names)."""
    data = path.read_bytes()
    assert data[:2] == b"MZ"
    e_lfanew = struct.unpack_from("<I", data, 0x3C)[0]
    assert data[e_lfanew:e_lfanew + 4] == b"PE\0\0"
    machine, nsections, timestamp = struct.unpack_from("<HHI", data, e_lfanew + 4)
    opt = e_lfanew + 24
    magic = struct.unpack_from("<H", data, opt)[0]
    subsystem = struct.unpack_from("<H", data, opt + 68)[0]
    return dict(Machine=machine, NumberOfSections=nsections, TimeDateStamp=timestamp,
                Magic=magic, Subsystem=subsystem)


needs_mkimage = pytest.mark.skipif(shutil.which("grub-mkimage") is None,
                                   reason="grub-mkimage (grub-common) missing")


@pytest.mark.network
@needs_mkimage
@pytest.mark.parametrize("arch", ["aarch64", "armv7"])
def test_grub_mkimage_builds_efi_application(grub_trees, tmp_path, arch):
    a = spec.ARCHES[arch]
    out = build_grub(arch=arch, grub_tree=grub_trees[arch], out=tmp_path / "a" / a.removable_name)
    h = pe_header(out)
    assert h["Machine"] == a.pe_machine            # 0xAA64 / 0x01C2
    assert h["Magic"] == a.pe_magic                # PE32+ / PE32
    assert h["Subsystem"] == spec.PE_SUBSYSTEM_EFI_APPLICATION
    data = out.read_bytes()
    for module in bootloader.GRUB_MODULES:         # module names are embedded in 'mods'
        assert module.encode() + b"\0" in data, module
    assert b"/EFI/BOOT\0" in data                  # the prefix


@pytest.mark.network
@needs_mkimage
@pytest.mark.parametrize("arch", ["aarch64", "armv7"])
def test_grub_mkimage_is_deterministic(grub_trees, tmp_path, arch):
    """Same inputs -> same bytes, whatever the output directory, module order or
    SOURCE_DATE_EPOCH (grub-mkimage writes a fixed TimeDateStamp and no paths)."""
    one = build_grub(arch=arch, grub_tree=grub_trees[arch], out=tmp_path / "1.efi",
                     extra_modules=["search", "gzio"])
    os.environ["SOURCE_DATE_EPOCH"] = "1"
    try:
        two = build_grub(arch=arch, grub_tree=grub_trees[arch], out=tmp_path / "x" / "2.efi",
                         extra_modules=["gzio", "search"])
    finally:
        del os.environ["SOURCE_DATE_EPOCH"]
    assert one.read_bytes() == two.read_bytes()
    plain = build_grub(arch=arch, grub_tree=grub_trees[arch], out=tmp_path / "3.efi")
    assert plain.read_bytes() != one.read_bytes()     # extra modules do change the image
    assert len(one.read_bytes()) > len(plain.read_bytes())


@pytest.mark.network
@needs_mkimage
def test_grub_unknown_module_is_refused(grub_trees, tmp_path):
    with pytest.raises(ArmvmError, match="'nosuchmod' is not in"):
        build_grub(arch="aarch64", grub_tree=grub_trees["aarch64"], out=tmp_path / "x.efi",
                   extra_modules=["nosuchmod"])


# --- offline error paths ------------------------------------------------------------------

def fake_grub_tree(root: Path, target: str = "arm64-efi") -> Path:
    d = root / "usr" / "lib" / "grub" / target
    d.mkdir(parents=True)
    (d / "moddep.lst").write_text("normal: boot\n")
    return root


def test_missing_grub_mkimage(tmp_path, monkeypatch):
    tree = fake_grub_tree(tmp_path)
    monkeypatch.setattr(bootloader.shutil, "which", lambda name: None)
    with pytest.raises(MissingToolError) as e:
        build_grub(arch="aarch64", grub_tree=tree, out=tmp_path / "x.efi")
    assert "'grub-mkimage'" in str(e.value) and "grub-common" in str(e.value)


def test_missing_modules_dir_names_the_package(tmp_path):
    tree = fake_grub_tree(tmp_path, "arm64-efi")        # arm64 modules, asked for armv7
    with pytest.raises(ArmvmError) as e:
        build_grub(arch="armv7", grub_tree=tree, out=tmp_path / "x.efi")
    assert "usr/lib/grub/arm-efi/" in str(e.value) and "'grub-efi-arm-bin'" in str(e.value)


@pytest.mark.parametrize("bad", ["../x", "a b", "mod;rm", ""])
def test_bad_module_names(tmp_path, bad):
    tree = fake_grub_tree(tmp_path)
    with pytest.raises(ArmvmError, match="not valid"):
        build_grub(arch="aarch64", grub_tree=tree, out=tmp_path / "x.efi", extra_modules=[bad])


def test_grub_mkimage_failure_is_reported(tmp_path, monkeypatch):
    tree = fake_grub_tree(tmp_path)
    tool = tmp_path / "grub-mkimage"
    tool.write_text("#!/bin/sh\necho 'grub-mkimage: error: cannot open foo' >&2\nexit 1\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with pytest.raises(ArmvmError, match="grub-mkimage failed .*cannot open foo"):
        build_grub(arch="aarch64", grub_tree=tree, out=tmp_path / "o" / "x.efi")


def test_find_signed_grub(tmp_path):
    p = tmp_path / "usr/lib/grub/arm64-efi-signed/grubaa64.efi.signed"
    p.parent.mkdir(parents=True)
    p.write_bytes(b"MZ")
    (tmp_path / "usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed").write_bytes(b"MZ")
    assert find_signed_grub(tmp_path, "aarch64") == p
    # found elsewhere in the tree too
    other = tmp_path / "moved"
    other.mkdir()
    p.rename(other / p.name)
    assert find_signed_grub(tmp_path, spec.ARCHES["aarch64"]) == other / p.name


def test_grub_packages():
    assert bootloader.grub_package("aarch64") == "grub-efi-arm64-bin"
    assert bootloader.grub_package("armv7") == "grub-efi-arm-bin"
    assert bootloader.grub_package("aarch64", signed=True) == "grub-efi-arm64-signed"
    with pytest.raises(ArmvmError, match="no signed GRUB"):
        bootloader.grub_package("armv7", signed=True)


def test_find_signed_grub_errors(tmp_path):
    with pytest.raises(ArmvmError, match="no signed GRUB for armv7"):
        find_signed_grub(tmp_path, "armv7")
    with pytest.raises(ArmvmError, match="grubaa64.efi.signed' not found.*grub-efi-arm64-signed"):
        find_signed_grub(tmp_path, "aarch64")
    with pytest.raises(ArmvmError, match="unknown architecture"):
        find_signed_grub(tmp_path, "x86_64")


# --- grub.cfg -----------------------------------------------------------------------------

def test_default_grub_cfg():
    cfg = render_grub_cfg(cmdline="console=ttyAMA0 panic=-1")
    lines = [ln.strip() for ln in cfg.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines == ["set timeout=0", "set default=0", 'menuentry "Linux" {',
                     f"linux /{spec.ESP_KERNEL_PATH} console=ttyAMA0 panic=-1",
                     f"initrd /{spec.ESP_INITRD_PATH}", "}"]
    assert not any(ln.startswith("search") for ln in lines)   # $root: the ESP GRUB came from


def test_grub_cfg_options():
    cfg = render_grub_cfg(kernel_path="/boot/Image", initrd_path=None, cmdline="", timeout=5)
    assert "set timeout=5" in cfg and "linux /boot/Image" in cfg and "initrd" not in cfg


def test_grub_cfg_quotes_words_grub_would_expand():
    cfg = render_grub_cfg(cmdline="root=$x a;b c#d {e} ok=1,2")
    assert "linux /vmlinuz 'root=$x' 'a;b' 'c#d' '{e}' ok=1,2" in cfg


@pytest.mark.skipif(shutil.which("grub-script-check") is None, reason="grub-script-check missing")
@pytest.mark.parametrize("cmdline", ["console=ttyAMA0", "a=$x b;c d&e |f <g> {h} #i"])
def test_grub_cfg_passes_grub_script_check(tmp_path, cmdline):
    """GRUB's own parser accepts what we write (external validator, grub-common)."""
    f = tmp_path / "grub.cfg"
    f.write_text(render_grub_cfg(cmdline=cmdline))
    proc = subprocess.run(["grub-script-check", str(f)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and grub-script-check does reject a broken one (the check is meaningful)
    f.write_text('menuentry "x" {\n linux /a "b\n')
    assert subprocess.run(["grub-script-check", str(f)], capture_output=True).returncode != 0


@pytest.mark.parametrize("cmdline", ['a="b c"', "it's", "a\\b", "a\nb", "a\tb", "x" * 2048])
def test_grub_cfg_rejects_what_grub_would_change(cmdline):
    with pytest.raises(ArmvmError, match="command line"):
        render_grub_cfg(cmdline=cmdline)


@pytest.mark.parametrize("path", ["../vmlinuz", "a/../b", "vm linuz", "a\\b", ""])
def test_grub_cfg_rejects_bad_paths(path):
    with pytest.raises(ArmvmError, match="kernel path"):
        render_grub_cfg(kernel_path=path, cmdline="x")


def test_custom_template_and_filter():
    t = "linux {{ kernel_path }} {{ cmdline_grub }} extra={{ 'a b' | grub_quote }}\n"
    assert render_grub_cfg(cmdline="q=1", template=t) == "linux /vmlinuz q=1 extra='a b'\n"


HOSTILE = [
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_template_is_blocked(template):
    with pytest.raises(ArmvmError, match="grub.cfg template"):
        render_grub_cfg(cmdline="x", template=template)


def test_hostile_template_would_work_unsandboxed():
    """The sandbox is what stops it: a plain Environment leaks the module globals."""
    from jinja2.utils import Cycler
    out = Environment().from_string(HOSTILE[1]).render(cycler=Cycler)
    assert "__builtins__" in out


@pytest.mark.parametrize("template", [
    "{{ 'a' * 100000000 }}",
    "{{ 'a' * 60000 * 60000 }}",
    "{{ ['a'] * 100000 }}",
    "{{ 2 ** 100000 }}",
    "{{ 'a'.ljust(1000000000) }}",
    "{% for i in range(100000) %}x{% endfor %}",
    "{% for i in range(1000) %}{{ 'x' * 1000 }}{% endfor %}",
])
def test_template_output_is_bounded(template):
    with pytest.raises(ArmvmError, match="too large|exceeds"):
        render_grub_cfg(cmdline="x", template=template)


@pytest.mark.parametrize("template", [
    "{{ 'a' | center(1000000000) }}",
    "{{ 'a' | indent(100000) }}",
    "{{ 'a'.ljust(5) }}",
    "{{ 'ab'.replace('a', 'aaaa') }}",
    "{{ '{:>9}'.format(1) }}",
    "{{ '{x:>9}'.format_map({'x': 1}) }}",
    "{{ '{:>9}'['format'](1) }}",
])
def test_expanding_filters_and_methods_are_not_offered(template):
    with pytest.raises(ArmvmError, match="grub.cfg template"):
        render_grub_cfg(cmdline="x", template=template)


def test_ordinary_template_features_still_work():
    t = ("{% for w in cmdline.split() %}{{ w | upper }};{% endfor %}"
         "{{ range(3) | join(',') }} {{ 'x' * 3 }} {{ kernel_path | default('k') }}\n")
    assert render_grub_cfg(cmdline="a b", template=t) == "A;B;0,1,2 xxx /vmlinuz\n"


@pytest.mark.parametrize("template, what", [
    ("{{ nosuchvar }}", "UndefinedError"),
    ("{% if %}", "TemplateSyntaxError"),
])
def test_template_errors_are_armvm_errors(template, what):
    with pytest.raises(ArmvmError, match=what):
        render_grub_cfg(cmdline="x", template=template)
