"""Recipe loading: rendering in a sandbox, validation, and one clear error per bad input."""
from __future__ import annotations

import json
import textwrap

import pytest

from builder.errors import ArmvmError, RecipeError
from builder.recipe.load import load_recipe, parse_set
from builder.recipe.validate import parse_size

GOOD = """\
name: demo
arch: aarch64
vars:
  disk_size: 512MiB
bootloader: {type: efi, file: files/loader.efi}
disk:
  size: "{{ disk_size }}"
  sector_size: 512
  partitions:
    - type: esp
      size: 256MiB
      label: ESP
      files:
        - {file: files/grub.cfg, dest: EFI/BOOT/grub.cfg}
"""


def write(tmp_path, text, name="r.yaml"):
    (tmp_path / "files").mkdir(exist_ok=True)
    (tmp_path / "files" / "loader.efi").write_bytes(b"MZ")
    (tmp_path / "files" / "grub.cfg").write_text("x")
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path, text, **kw) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), environ={}, **kw)
    return info.value


def test_good_recipe_loads_with_vars_and_paths(tmp_path):
    r = load_recipe(write(tmp_path, GOOD), environ={})
    assert r.name == "demo" and r.arch == "aarch64"
    assert r.disk.size == 512 * 1024 ** 2
    assert r.disk.partitions[0].size == 256 * 1024 ** 2
    assert r.bootloader.source.file == (tmp_path / "files" / "loader.efi").resolve()
    assert r.disk.partitions[0].files[0].dest == "EFI/BOOT/grub.cfg"


def test_override_order_recipe_env_set(tmp_path):
    p = write(tmp_path, GOOD)
    assert load_recipe(p, environ={"ARMVM_VAR_disk_size": "1GiB"}).disk.size == 1024 ** 3
    r = load_recipe(p, environ={"ARMVM_VAR_disk_size": "1GiB"}, overrides=parse_set(["disk_size=2GiB"]))
    assert r.disk.size == 2 * 1024 ** 3


def test_other_environment_variables_are_invisible(tmp_path, monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "hunter2")
    err = error_of(tmp_path, GOOD.replace("{{ disk_size }}", "{{ SECRET_TOKEN }}"))
    assert "SECRET_TOKEN" in str(err) and "undefined" in str(err)


def test_digest_independent_of_folder_and_vars_spelling(tmp_path):
    a = load_recipe(write(tmp_path / "a" if (tmp_path / "a").mkdir() is None else None, GOOD), environ={})
    b = load_recipe(write(tmp_path / "b" if (tmp_path / "b").mkdir() is None else None,
                          GOOD.replace("{{ disk_size }}", "512MiB")), environ={})
    assert a.digest == b.digest
    c = load_recipe(write(tmp_path, GOOD.replace("label: ESP", "label: BOOT")), environ={})
    assert c.digest != a.digest


@pytest.mark.parametrize("text, expect", [
    ("name: [demo\n", ["malformed YAML", ":1:", "flow sequence opened on this line"]),
    (GOOD + "colour: blue\n", ["unknown field 'colour'", ":15", "allowed: name, arch"]),
    (GOOD.replace("arch: aarch64\n", ""), ["missing required field 'arch'"]),
    (GOOD.replace("sector_size: 512", "sector_size: big"), ["disk.sector_size", "expected an integer", ":8"]),
    (GOOD.replace("sector_size: 512", "sector_size: 1024"), ["disk.sector_size", "allowed: 512, 4096"]),
    (GOOD.replace("size: 256MiB", "size: lots"), ["disk.partitions[0].size", "cannot parse size 'lots'", ":11"]),
    (GOOD.replace("arch: aarch64", "arch: x86_64"), ["field 'arch'", "allowed: aarch64, armv7", ":2"]),
    (GOOD.replace("files/grub.cfg", "files/missing.cfg").replace("{file: files/missing.cfg, dest",
                                                                  "{file: ../../etc/passwd, dest"),
     ["leaves the recipe's folder"]),
    (GOOD.replace("dest: EFI/BOOT/grub.cfg", "dest: ../grub.cfg"), ["contains '..'", "dest"]),
    (GOOD.replace("dest: EFI/BOOT/grub.cfg", "dest: /etc/grub.cfg"), ["absolute path"]),
    (GOOD.replace("dest: EFI/BOOT/grub.cfg", "dest: 'EFI/BOOT/a:b'"), ["FAT cannot store the name 'a:b'"]),
    (GOOD.replace("{file: files/grub.cfg,", "{url: 'https://example.invalid/x',"), ["a url needs its sha256"]),
    (GOOD.replace("{file: files/grub.cfg,", "{file: files/grub.cfg, package: grub,"), ["more than one source"]),
    (GOOD.replace("vars:\n  disk_size: 512MiB", "vars:\n  disk_size: '{{ 1 }}'"), ["never templated"]),
    (GOOD.replace("name: demo", "name: ../evil"), ["field 'name'", "does not have the allowed form"]),
    (GOOD.replace("label: ESP", "label: esp-lower"), ["field 'disk.partitions[0].label'"]),
    ("", ["empty"]),
    ("- a\n- b\n", ["must be a YAML mapping"]),
    ("name: demo\nname: again\n", ["duplicate key 'name'", ":2"]),
])
def test_bad_recipes_name_file_line_field(tmp_path, text, expect):
    err = str(error_of(tmp_path, text))
    assert "r.yaml" in err
    for part in expect:
        assert part in err, (part, err)


def test_template_output_size_is_capped(tmp_path):
    err = error_of(tmp_path, "name: \"{% for i in range(3000) %}{{ 'a' * 1000 }}{% endfor %}\"\n")
    assert "renders to more than 1048576 bytes" in str(err)


def test_template_cannot_reach_python_internals(tmp_path):
    err = error_of(tmp_path, "name: \"{{ cycler.__init__.__globals__.os.system('id') }}\"\n")
    assert "sandbox" in str(err) or "undefined" in str(err)


def test_template_endless_loop_is_stopped(tmp_path, monkeypatch):
    from builder.recipe import templating
    monkeypatch.setattr(templating, "TEMPLATE_SECONDS", 0.5)
    text = "{% for a in range(10000) %}{% for b in range(10000) %}{% endfor %}{% endfor %}name: demo\n"
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), environ={})
    assert "took longer" in str(info.value)


def test_alias_bomb_is_bounded(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    err = error_of(tmp_path, "\n".join(lines) + "\n")
    assert "too many YAML nodes" in str(err)


@pytest.mark.parametrize("text, value", [("512MiB", 512 << 20), ("1GiB", 1 << 30), ("4096", 4096),
                                         ("2 MB", 2_000_000), (1048576, 1048576), ("1.5GiB", 3 << 29)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["-1MiB", "12 parsecs", "0", "99TiB", True])
def test_parse_size_rejects(text):
    with pytest.raises(RecipeError):
        parse_size(text, file="r.yaml")


def test_set_requires_name_value():
    with pytest.raises(ArmvmError) as info:
        parse_set(["novalue"])
    assert "name=value" in str(info.value) and info.value.exit_code == 2


def test_schema_is_json_and_documents_every_field():
    from builder.recipe.schema import SCHEMA

    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            assert sub.get("description"), f"{path}.{key} has no description"
            walk(sub, f"{path}.{key}")
        if "items" in node:
            walk(node["items"], path + "[]")
    walk(SCHEMA, "")
    json.dumps(SCHEMA)


def test_error_line_in_a_template_that_changes_the_line_count_says_so(tmp_path):
    text = "name: demo\narch: aarch64\n{% for i in range(3) %}\nx{{ i }}: 1\n{% endfor %}\n"
    err = str(error_of(tmp_path, text))
    assert "r.yaml:4:" in err and "unknown field 'x0'" in err and "line 4 of the rendered recipe" in err
    err = str(error_of(tmp_path, "name: demo\narch: aarch64\ncolour: {{ 'blue' }}\n"))
    assert "r.yaml:3:" in err and "rendered" not in err
