"""Every template a recipe controls (the recipe, grub.cfg, /init) is bounded in memory and
time, compile included, and --set / ARMVM_VAR_ values are scalars that cannot add keys.

Each bomb runs under an address-space limit set inside the test (resource.setrlimit), so a
regression fails with MemoryError instead of swapping the machine.
"""
from __future__ import annotations

import resource
import textwrap

import pytest

from builder.payload.bootloader import render_grub_cfg
from builder.errors import RecipeError
from builder.payload.initramfs import render_init
from builder.recipe.load import load_recipe

HEADROOM = 1024 * 1024 * 1024          # what this test process may add while a bomb runs


@pytest.fixture
def memory_cap():
    """Cap this process's address space at its current size + 1 GiB for the test."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    old = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + HEADROOM
    if old[1] != resource.RLIM_INFINITY:
        cap = min(cap, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, old)


def recipe_error(tmp_path, text, **kw) -> str:
    p = tmp_path / "bomb.yaml"
    p.write_text(textwrap.dedent(text))
    with pytest.raises(RecipeError) as info:
        load_recipe(p, environ=kw.pop("environ", {}), **kw)
    return str(info.value)


DOUBLING = ('{% set ns = namespace(s="a") %}\n'
            '{% for i in range(31) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}\n')


@pytest.mark.parametrize("body, expect", [
    ("name: \"{{ ('%03000000000d' % 1)|length }}\"\n", "'%' format width 3000000000"),
    ('name: "{{ "a"*3000000000 }}"\n', "3000000000 is too large"),
    ("name: x\n" + DOUBLING, "needs more than 256 MiB"),          # '~' is not interceptable
    ("name: x\n" + DOUBLING.replace("~", "+"), "'+' would build"),
])
def test_recipe_template_bombs_are_refused_with_file_and_line(tmp_path, memory_cap, body, expect):
    err = recipe_error(tmp_path, body)
    assert expect in err, err
    assert "bomb.yaml:" in err and "recipe template" in err


def test_recipe_bomb_reports_its_line(tmp_path, memory_cap):
    err = recipe_error(tmp_path, 'name: x\narch: aarch64\nseed: "{{ "a" * 3000000000 }}"\n')
    assert "bomb.yaml:3:" in err


def test_init_template_bomb_is_refused(tmp_path, memory_cap):
    init = tmp_path / "init.j2"
    with pytest.raises(RecipeError) as info:
        render_init("#!/bin/sh\n" + DOUBLING, {}, template_file=init)
    err = str(info.value)
    assert "init.j2:3:" in err and "needs more than 256 MiB" in err and "initramfs.init" in err


def test_grub_template_bomb_is_refused(tmp_path, memory_cap):
    cfg = tmp_path / "grub.cfg.j2"
    with pytest.raises(RecipeError) as info:
        render_grub_cfg(cmdline="x", template="# grub\n" + DOUBLING, template_file=cfg)
    assert "grub.cfg.j2:3:" in str(info.value)


def test_compile_time_folding_is_inside_the_bound(tmp_path, memory_cap):
    """Jinja's optimizer would fold this constant while compiling, before any render-time
    check: it must be refused, not allocated."""
    with pytest.raises(RecipeError, match="too large"):
        render_init('#!/bin/sh\n{{ "a" * 3000000000 }}\n', {})


def test_template_time_is_bounded_compile_and_render(tmp_path, monkeypatch):
    from builder.recipe import templating
    monkeypatch.setattr(templating, "TEMPLATE_SECONDS", 0.5)
    with pytest.raises(RecipeError, match="took longer than 0.5 s"):
        render_init("#!/bin/sh\n{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}"
                    "{% endfor %}\n", {})


def test_template_errors_name_file_line_and_valid_names(tmp_path):
    cfg = tmp_path / "my-grub.cfg"
    with pytest.raises(RecipeError) as info:
        render_grub_cfg(cmdline="x", template="set timeout=0\nlinux {{ kernel_pth }}\n", template_file=cfg)
    err = str(info.value)
    assert f"{cfg}:2:" in err and "kernel_pth" in err
    assert "cmdline, cmdline_grub, initrd_path, kernel_path, timeout" in err
    with pytest.raises(RecipeError) as info:
        render_init("#!/bin/sh\n\n{{ modules_list }}\n", {}, template_file=tmp_path / "init")
    err = str(info.value)
    assert ":3:" in err and "module_names, modules" in err and "boot_marker" in err
    err = recipe_error(tmp_path, "vars: {suite: trixie}\nname: x\narch: {{ arhc }}\n")
    assert "bomb.yaml:3:" in err and "'arhc' is undefined" in err and "suite" in err


# --- 9.9: values are scalars ----------------------------------------------------------------
RECIPE = """\
name: demo
arch: aarch64
vars: {suite: trixie, comp: main, extra: ""}
debian: {suite: "{{ suite }}", components: [{{ comp }}]}
kernel: {file: vmlinuz, cmdline: "console=ttyAMA0 {{ extra }}"}
bootloader: {type: efi, file: loader.efi}
disk:
  size: 512MiB
  partitions:
    - type: esp
      size: 256MiB
"""


def write_recipe(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "loader.efi").write_bytes(b"MZ")
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    return p


def test_newline_in_a_set_value_cannot_add_keys(tmp_path):
    p = write_recipe(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe(p, environ={}, overrides={"suite": 'trixie"\nmirror: "http://evil.example/'})
    err = str(info.value)
    assert "debian.suite" in err and "r.yaml:4" in err and "does not have the allowed form" in err


def test_flow_syntax_in_an_env_value_cannot_add_keys(tmp_path):
    p = write_recipe(tmp_path)
    with pytest.raises(RecipeError) as info:
        load_recipe(p, environ={"ARMVM_VAR_comp": "main], mirror: [http://evil.example/"})
    assert "debian.components[0]" in str(info.value)


def test_values_land_verbatim_inside_their_scalar(tmp_path):
    p = write_recipe(tmp_path)
    tricky = 'quiet "x" a: b # not a comment \\n'
    r = load_recipe(p, environ={}, overrides={"extra": tricky, "suite": "sid"})
    assert r.kernel.cmdline == "console=ttyAMA0 " + tricky
    assert r.debian.suite == "sid" and r.debian.components == ("main",)
    assert "mirror" not in r.data["debian"]


def test_plain_words_keep_their_yaml_meaning(tmp_path):
    p = tmp_path / "r.yaml"
    (tmp_path / "loader.efi").write_bytes(b"MZ")
    p.write_text("name: demo\narch: aarch64\nbootloader: {type: efi, file: loader.efi}\n"
                 "output: {bmap: {{ bmap }}}\n"
                 "disk: {size: 512MiB, sector_size: {{ ss }}, partitions: [{type: esp}]}\n")
    r = load_recipe(p, environ={"ARMVM_VAR_ss": "4096"}, overrides={"bmap": "false"})
    assert r.disk.sector_size == 4096 and r.output.bmap is False
