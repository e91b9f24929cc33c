"""<name>.report.html: one self-contained page (no scripts, no fonts, no network) that shows
a build: the disk drawn to scale (plain SVG made here), the ESP's files inside it, the boot
chain, the inputs with versions and hashes, and the verify table. `armvm-build boot
--report` adds the boot timeline and the guest's runtime report.

Everything shown comes from the manifest, the verify report and the boot result, all of
which carry names from untrusted recipes and images: every text goes through html.escape.
The page depends on nothing but its inputs, so a build's report is reproducible.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

WIDTH = 960
COLORS = {"esp": "#4e79a7", "root": "#59a14f", "gpt": "#9c755f", "free": "#eeeeee",
          "loader": "#f28e2b", "kernel": "#e15759", "initrd": "#76b7b2", "grub.cfg": "#edc948",
          "file": "#b07aa1", "other": "#bab0ac"}
RESULT_COLORS = {"pass": "#d8f0d8", "fail": "#f6d0d0", "warn": "#fbeec8", "skip": "#eeeeee"}
CSS = """
body{font-family:sans-serif;margin:24px;color:#222;max-width:1000px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px;width:100%}
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4}code,.hash{font-family:monospace;font-size:12px;word-break:break-all}
.pass{background:#d8f0d8}.fail{background:#f6d0d0}.warn{background:#fbeec8}.skip{background:#eee}
svg text{font-family:sans-serif;font-size:12px}
"""


def e(value) -> str:
    """Escape any value for HTML text and attribute values."""
    return html.escape("" if value is None else str(value), quote=True)


def _size(n: int) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _rect(x, y, w, h, fill, title, label="", text_fill="#fff") -> str:
    out = (f'<g><title>{e(title)}</title><rect x="{x:.1f}" y="{y}" width="{max(w, 1.0):.1f}" height="{h}" '
           f'fill="{fill}" stroke="#333" stroke-width="0.5"/>')
    if label and w > 7 * len(label):
        out += (f'<text x="{x + w / 2:.1f}" y="{y + h / 2 + 4}" text-anchor="middle" '
                f'fill="{text_fill}">{e(label)}</text>')
    return out + "</g>"


def disk_svg(layout: dict) -> str:
    """The whole disk to scale: GPT areas, partitions, free space; then each partition
    with files (the ESP) as a second bar, its files to the scale of the partition."""
    total = max(layout["disk_bytes"], 1)
    sector = layout.get("sector_size", 512)
    scale = WIDTH / total
    parts = sorted(layout["partitions"], key=lambda p: p["offset"])
    y, h = 20, 40
    items = [f'<text x="0" y="14">disk: {e(_size(total))}, {e(sector)}-byte sectors, '
             f'GUID {e(layout.get("disk_guid"))}</text>']
    gpt = 34 * sector if sector == 512 else 6 * sector
    items.append(_rect(0, y, gpt * scale, h, COLORS["gpt"], f"protective MBR + primary GPT ({gpt} bytes)"))
    pos = gpt
    for p in parts:
        if p["offset"] > pos:
            items.append(_rect(pos * scale, y, (p["offset"] - pos) * scale, h, COLORS["free"],
                               f"unpartitioned, {p['offset'] - pos} bytes", ""))
        kind = p.get("kind") or "other"
        label = f"{p.get('name') or kind} {_size(p['size'])}"
        items.append(_rect(p["offset"] * scale, y, p["size"] * scale, h, COLORS.get(kind, COLORS["other"]),
                           f"partition {p['number']}: {p.get('name')} ({kind}), {p['size']} bytes at "
                           f"{p['offset']}, type {p['type_guid']}", label))
        pos = p["offset"] + p["size"]
    backup = 33 * sector if sector == 512 else 5 * sector
    if total - backup > pos:
        items.append(_rect(pos * scale, y, (total - backup - pos) * scale, h, COLORS["free"], "free space"))
    items.append(_rect((total - backup) * scale, y, backup * scale, h, COLORS["gpt"], "backup GPT"))
    height = y + h + 10
    for p in parts:
        files = p.get("files") or []
        if not files:
            continue
        height += 20
        items.append(f'<text x="0" y="{height}">partition {e(p["number"])} ({e(p.get("name"))}, '
                     f'{e(p.get("filesystem") or "")}) and its files, to the scale of the partition</text>')
        height += 8
        fscale = WIDTH / max(p["size"], 1)
        x = 0.0
        items.append(_rect(0, height, WIDTH, h, COLORS["free"], "file system metadata and free space"))
        for f in files:
            w = f["size"] * fscale
            items.append(_rect(x, height, w, h, COLORS.get(f.get("role"), COLORS["file"]),
                               f"{f['dest']}: {f['size']} bytes, sha256 {f['sha256']}",
                               f["dest"].rsplit("/", 1)[-1]))
            x += max(w, 1.0)
        height += h + 4
        for i, f in enumerate(files):            # a legend: every file named, even tiny ones
            height += 16
            items.append(f'<rect x="0" y="{height - 10}" width="10" height="10" '
                         f'fill="{COLORS.get(f.get("role"), COLORS["file"])}"/>'
                         f'<text x="16" y="{height}">{e(f["dest"])} ({e(_size(f["size"]))})</text>')
        height += 6
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="disk layout">' + "".join(items) + "</svg>")


def boot_chain(manifest: dict) -> List[Tuple[str, str]]:
    """(stage, what) from the firmware to the root file system."""
    esp = next((p for p in manifest["layout"]["partitions"] if p.get("kind") == "esp"), None)
    files = {f.get("role"): f for f in (esp or {}).get("files", [])}
    for f in (esp or {}).get("files", []):          # a prebuilt loader's kernel/initrd: by path
        role = {"vmlinuz": "kernel", "initrd.img": "initrd"}.get(f["dest"])
        if role:
            files.setdefault(role, f)
    inputs = {i["role"]: i["origin"] for i in manifest.get("inputs", [])}
    loader = files.get("loader")
    chain = [("firmware", "UEFI (AAVMF under QEMU) reads the GPT and the ESP's removable path")]
    chain.append(("loader", f"{loader['dest']} ({inputs.get('bootloader', 'a prebuilt EFI binary')})"
                  if loader else "no loader"))
    uki = "kernel" not in files and "bootloader" in inputs and "systemd-boot" in inputs.get("bootloader", "")
    if "kernel" in files:
        chain.append(("kernel", f"{files['kernel']['dest']} ({inputs.get('kernel', 'file')})"))
    elif uki:
        chain.append(("kernel", f"inside the unified kernel image ({inputs.get('kernel', '')})"))
    mods = manifest.get("initramfs", {}).get("modules", [])
    if "initrd" in files or uki:
        where = files["initrd"]["dest"] if "initrd" in files else "inside the unified kernel image"
        chain.append(("initramfs", f"{where}, {len(mods)} kernel modules"))
    root = next((p for p in manifest["layout"]["partitions"] if p.get("kind") == "root"), None)
    chain.append(("root", f"partition {root['number']} ({root.get('filesystem') or root.get('name')})"
                  if root else "/init in the initramfs (no root partition)"))
    return chain


def chain_svg(chain: Sequence[Tuple[str, str]]) -> str:
    n = len(chain)
    box, gap = (WIDTH - 20 * (n - 1)) / n, 20
    items = ['<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="6" refY="4" orient="auto">'
             '<path d="M0,0 L8,4 L0,8 z" fill="#333"/></marker></defs>']
    for i, (stage, what) in enumerate(chain):
        x = i * (box + gap)
        items.append(_rect(x, 10, box, 44, ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f"][i % 5],
                           f"{stage}: {what}", stage))
        if i:
            items.append(f'<line x1="{x - gap + 2:.1f}" y1="32" x2="{x - 3:.1f}" y2="32" stroke="#333" '
                         'stroke-width="2" marker-end="url(#arrow)"/>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="64" viewBox="0 0 {WIDTH} 64" '
            'role="img" aria-label="boot chain">' + "".join(items) + "</svg>")


def timeline_svg(events: Dict[str, float]) -> str:
    """Milestones as bars: each from the previous milestone to its own time (seconds since
    QEMU started)."""
    order = sorted(events.items(), key=lambda kv: kv[1])
    end = max([t for _, t in order] + [0.001])
    scale = (WIDTH - 260) / end
    items, y, prev = [], 0, 0.0
    for name, t in order:
        items.append(f'<text x="0" y="{y + 14}">{e(name)}</text>')
        items.append(_rect(160 + prev * scale, y + 2, (t - prev) * scale, 16, "#4e79a7",
                           f"{name}: {prev:.2f} s to {t:.2f} s"))
        items.append(f'<text x="{166 + t * scale:.1f}" y="{y + 14}">{t:.2f} s</text>')
        prev, y = t, y + 22
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y + 4}" viewBox="0 0 {WIDTH} {y + 4}" '
            'role="img" aria-label="boot timeline">' + "".join(items) + "</svg>")


def _table(headers: Sequence[str], rows: Sequence[Sequence], row_class=None, id_=None) -> str:
    out = [f'<table{f" id={chr(34)}{e(id_)}{chr(34)}" if id_ else ""}><tr>'
           + "".join(f"<th>{e(h)}</th>" for h in headers) + "</tr>"]
    for r in rows:
        cls = row_class(r) if row_class else None
        out.append(f'<tr{f" class={chr(34)}{e(cls)}{chr(34)}" if cls else ""}>'
                   + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def render(manifest: Optional[dict], verify: Optional[dict], boot: Optional[dict] = None,
           name: str = "") -> str:
    """The page. `boot`: {"ok", "reason", "events", "report": [(key, value)...]} or None;
    without a manifest (an image built elsewhere) only the verify and boot parts."""
    body: List[str] = []
    if manifest is not None:
        name = manifest["recipe"]["name"]
        body = _build_part(manifest)
    else:
        body = [f"<h1>armvm-build report: {e(name)}</h1>",
                "<p>No build manifest beside the image: layout, boot chain and inputs are not shown.</p>"]
    if verify is not None:
        body += _verify_part(verify)
    if boot is not None:
        body += ['<h2 id="boot">Boot</h2>',
                 f"<p>{'booted' if boot.get('ok') else 'FAILED'}: {e(boot.get('reason'))}</p>",
                 timeline_svg(boot.get("events") or {}),
                 _table(["milestone", "seconds since QEMU started"],
                        [[e(k), e(f"{v:.2f}")] for k, v in sorted((boot.get("events") or {}).items(),
                                                                  key=lambda kv: kv[1])], id_="timeline-table"),
                 _table(["runtime report", "value"], [[e(k), e(v)] for k, v in boot.get("report", [])],
                        id_="runtime-table")]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
            f"<title>{e(name)}: armvm-build report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _build_part(manifest: dict) -> List[str]:
    name = manifest["recipe"]["name"]
    when = datetime.fromtimestamp(manifest["source_date_epoch"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = [f"<h1>armvm-build report: {e(name)}</h1>",
            _table(["field", "value"], [
                ["image files", ", ".join(f"<code>{e(n)}</code>" for n in
                                          manifest.get("outputs", {}).get("images", [f"{name}.raw"]))], ["architecture", e(manifest["recipe"]["arch"])],
                ["tool", e(f"armvm-build {manifest['tool']['version']}")],
                ["SOURCE_DATE_EPOCH", e(f"{manifest['source_date_epoch']} ({when})")],
                ["seed", f'<span class="hash">{e(manifest.get("seed"))}</span>'],
                ["recipe digest", f'<span class="hash">{e(manifest["recipe"].get("digest"))}</span>'],
            ] + ([["image sha256", f'<span class="hash">{e(manifest["image_sha256"])}</span>']]
                 if manifest.get("image_sha256") else [])),
            '<h2 id="disk">Disk layout (to scale)</h2>', disk_svg(manifest["layout"]),
            _table(["#", "name", "kind", "type GUID", "partition GUID", "offset", "size", "file system"],
                   [[e(p["number"]), e(p.get("name")), e(p.get("kind")), f'<span class="hash">{e(p["type_guid"])}</span>',
                     f'<span class="hash">{e(p.get("unique_guid"))}</span>', e(p["offset"]), e(_size(p["size"])),
                     e(p.get("filesystem"))] for p in manifest["layout"]["partitions"]], id_="partitions"),
            '<h2 id="chain">Boot chain</h2>', chain_svg(boot_chain(manifest)),
            _table(["stage", "what"], [[e(s), e(w)] for s, w in boot_chain(manifest)]),
            '<h2 id="inputs">Inputs</h2>',
            _table(["role", "origin", "version", "size", "sha256", "license"],
                   [[e(i["role"]), f"<code>{e(_origin_name(i['origin']))}</code>", e(_version(i["origin"])),
                     e(i.get("size")), f'<span class="hash">{e(i["sha256"])}</span>', e(i.get("license", ""))]
                    for i in manifest.get("inputs", [])], id_="inputs-table")]
    mods = manifest.get("initramfs", {}).get("modules", [])
    if mods:
        body.append(f"<p>Kernel modules in the initramfs ({len(mods)}): "
                    + ", ".join(f"<code>{e(m)}</code>" for m in mods) + "</p>")
    return body


def _verify_part(verify: dict) -> List[str]:
    counts = verify.get("summary", {}).get("counts", {})
    return ['<h2 id="verify">Verify</h2>',
            f"<p>profile {e(verify.get('profile'))}, exit code {e(verify.get('exit_code'))}: "
            + ", ".join(f"{e(k)} {e(v)}" for k, v in sorted(counts.items())) + "</p>",
            _table(["check", "level", "result", "detail", "requirement"],
                   [[f"<code>{e(c['id'])}</code>", e(c["level"]), e(c["result"]), e(c.get("detail")),
                     e(c.get("requirement"))] for c in verify.get("checks", [])],
                   row_class=lambda r: html.unescape(r[2]), id_="verify-table")]


def _origin_name(origin: str) -> str:
    return origin.split("=", 1)[0] if origin.startswith("debian:") else origin


def _version(origin: str) -> str:
    """The version part of a Debian origin (`debian:name=version`, maybe `:path` after it)."""
    return origin.split("=", 1)[1] if origin.startswith("debian:") and "=" in origin else ""


def runtime_lines(console: str) -> List[Tuple[str, str]]:
    """(key, value) of the guest's ARMVM-REPORT lines, in console order."""
    out = []
    for line in console.splitlines():
        if line.startswith("ARMVM-REPORT "):
            key, _, value = line[len("ARMVM-REPORT "):].partition("=")
            out.append((key.strip(), value.strip()))
    return out[:2000]


JSON_MAX = 16 << 20


def _read_json(path: Path) -> Optional[dict]:
    """A manifest or verify report beside the image: bounded, never a symlink."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > JSON_MAX:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def publish_boot_report(image: Path, boot: dict, console: str) -> Path:
    """`boot --report`: <name>.report.html beside the image, with the build's parts (from
    <name>.manifest.json and <name>.verify.json when they are there) plus the boot
    timeline and the runtime report; staged and renamed like every output."""
    from builder.publish.output import Staging
    stem = next((image.name[:-len(x)] for x in (".raw", ".qcow2") if image.name.endswith(x)), image.name)
    manifest = _read_json(image.parent / f"{stem}.manifest.json")
    try:
        if manifest is not None:
            render(manifest, None)            # a manifest we cannot draw is ignored
    except (KeyError, TypeError, ValueError, AttributeError):
        manifest = None
    verify = _read_json(image.parent / f"{stem}.verify.json")
    try:
        if verify is not None:
            render(None, verify)
    except (KeyError, TypeError, ValueError, AttributeError):
        verify = None
    page = render(manifest, verify, {**boot, "report": runtime_lines(console)}, name=stem)
    with Staging(image.parent, stem) as staging:
        staging.write_text(f"{stem}.report.html", page)
        staging.commit()
    return image.parent / f"{stem}.report.html"
