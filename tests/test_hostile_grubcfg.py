"""grub.cfg from an untrusted image (issue 9 item 4): a 679-byte config that doubles a
variable 30 or 40 times once took 13.5 s / 1.6 GB and 23.5 GB; now every expanded word,
the variable table, the sum of expansions and the text read are capped. Runs in a child
with RLIMIT_AS 512 MiB and RLIMIT_CPU 10 s (the issue's bound for verifying any image)."""
from __future__ import annotations

import json

import pytest

from tests.limits import run_limited


def doubling_cfg(times: int) -> str:
    lines = ["set timeout=0", "set a=AAAAAAAAAAAAAAAA"]
    lines += ['set a="$a$a"'] * times
    lines += ["menuentry 'x' {", "  linux /vmlinuz $a", "  initrd /initrd.img", "}"]
    return "\n".join(lines) + "\n"


READ = """
import json, sys
from builder.verify.grubcfg import read_grub_cfg
text = open(sys.argv[1]).read()
gb = read_grub_cfg(text, "/EFI/BOOT/grub.cfg", esp_part=1, fs_uuid="1234-ABCD", label="ESP",
                   exists=lambda p: True, read=lambda p: text)
print(json.dumps({"kernel": gb.kernel.path if gb.kernel else None, "problems": gb.problems}))
"""


@pytest.mark.parametrize("times", [30, 40, 64])
def test_doubling_variable_is_capped(tmp_path, times):
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(doubling_cfg(times))
    assert len(cfg.read_bytes()) < 1000
    r = run_limited(READ, mem_mib=512, cpu_s=10, args=[cfg])
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["kernel"] == "/vmlinuz"
    assert any("expands to more than 65536 bytes" in p for p in out["problems"]), out


def test_self_sourcing_and_many_variables_are_bounded(tmp_path):
    """A config that sources itself on every line, and one that sets 100k variables."""
    loop = tmp_path / "loop.cfg"
    loop.write_text("source /EFI/BOOT/grub.cfg\n" * 40000 + "linux /vmlinuz\n")
    r = run_limited(READ, mem_mib=512, cpu_s=10, args=[loop])
    assert r.returncode == 0, r.stderr[-2000:]
    assert any("evaluation stopped" in p for p in json.loads(r.stdout)["problems"])
    many = tmp_path / "many.cfg"
    many.write_text("".join(f"set v{i}={'x' * 60000}\n" for i in range(16)) +
                    "".join(f"set w{i}=$v{i % 16}$v{(i + 1) % 16}\n" for i in range(5000)) +
                    "linux /vmlinuz\n")
    r = run_limited(READ, mem_mib=512, cpu_s=10, args=[many])
    assert r.returncode == 0, r.stderr[-2000:]
    problems = json.loads(r.stdout)["problems"]
    assert any("more than 1024 variables" in p or "evaluation stopped" in p for p in problems)


def test_verify_whole_image_with_bomb_cfg(tmp_path):
    """`armvm-build verify` on an image whose ESP carries the 40-times doubling grub.cfg:
    clean report within 512 MiB and 10 s of CPU."""
    from builder.build import BuildOptions, build
    from tests.fixtures import efi_recipe
    recipe = efi_recipe(tmp_path)
    (tmp_path / "files" / "grub.cfg").write_text(doubling_cfg(40))
    res = build(recipe, BuildOptions(output_dir=tmp_path / "out", cache_dir=tmp_path / "c",
                                     progress=False, environ={"SOURCE_DATE_EPOCH": "0"}))
    image = res.image
    assert image is not None and image.exists()
    r = run_limited("""
import sys
from builder.cli import main
sys.argv = ["armvm-build", "verify", "--json", sys.argv[1]]
main()
""", mem_mib=512, cpu_s=10, args=[image])
    assert r.returncode in (0, 1), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    report = json.loads(r.stdout)
    chain = next(c for c in report["checks"] if c["id"] == "boot.chain")
    assert chain["result"] in ("pass", "warn", "fail")
