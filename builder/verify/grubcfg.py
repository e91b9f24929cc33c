"""A small reader for grub.cfg: which kernel and initrds the default entry boots.

It understands enough GRUB script for generated configs: quoting, comments, ``;``,
``{ }`` blocks (menuentry, submenu, if/function bodies are scanned too), variables
(``set``, ``$root``, ``${prefix}``), device prefixes (``($root)``, ``(hd0,gpt1)``),
``search`` (by file, FAT volume serial or label), and ``configfile``/``source`` on the ESP.
Paths are resolved relative to the ESP root when they name the ESP's device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

MAX_CFG = 1 << 20
MAX_DEPTH = 4            # configfile/source nesting
MAX_COMMANDS = 100000
# A grub.cfg from an untrusted image can double a variable per line (2^40 bytes in 40
# lines) or source itself in a loop: cap every expanded word, the variable table, the sum
# of all expansions, the menu entries and the config text read, then stop with a problem.
MAX_VALUE = 64 * 1024    # one expanded word or variable value
MAX_VARS = 1024          # variables set
MAX_EXPANDED = 16 << 20  # all expansions of one evaluation together
MAX_ENTRIES = 1000       # menu entries evaluated
MAX_READ = 4 << 20       # config text lexed, configfile/source included
MAX_PROBLEMS = 50
SQ_DOLLAR = "\x01"       # a '$' from single quotes: never expanded
VAR_RE = re.compile(r"\$(?:\{([A-Za-z0-9_?#]+)\}|([A-Za-z_][A-Za-z0-9_]*|[0-9#?]))")
KERNEL_CMDS = ("linux", "linuxefi", "linux16")
INITRD_CMDS = ("initrd", "initrdefi", "initrd16")


@dataclass
class Ref:
    cmd: str
    raw: str          # as written
    device: str       # 'esp' or a description of another device
    path: str         # absolute path on that device
    absolute: bool = True   # GRUB rejects file names that start with neither '/' nor '('
    args: str = ""          # linux: the kernel command line after the file (expanded, bounded)

    @property
    def on_esp(self) -> bool:
        return self.device == "esp"


@dataclass
class Entry:
    title: str
    body: list        # commands (lists of words) and nested Blocks


@dataclass
class Block:
    head: list        # words before '{'
    body: list


@dataclass
class GrubBoot:
    cfg_path: str
    entry_title: str = ""
    kernel: Optional[Ref] = None
    initrds: list = field(default_factory=list)
    refs: list = field(default_factory=list)        # every linux/initrd line in the config
    problems: list = field(default_factory=list)
    elsewhere: list = field(default_factory=list)   # configfile/source on other devices


def lex(text: str) -> list:
    """Commands as lists of words; '{' and '}' are separate one-word commands."""
    cmds, words, cur, in_word = [], [], [], False
    i, n = 0, len(text)

    def end_word():
        nonlocal cur, in_word
        if in_word:
            words.append("".join(cur))
        cur, in_word = [], False

    def end_cmd():
        nonlocal words
        end_word()
        if words:
            cmds.append(words)
        words = []

    while i < n:
        c = text[i]
        if c == "#" and not in_word:
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c in " \t\r":
            end_word()
        elif c in "\n;":
            end_cmd()
        elif c in "{}" and not in_word and (i + 1 == n or text[i + 1] in " \t\r\n;"):
            end_cmd()
            cmds.append([c])
        elif c == "\\" and i + 1 < n:
            if text[i + 1] != "\n":
                cur.append(text[i + 1])
                in_word = True
            i += 1
        elif c == "'":
            j = text.find("'", i + 1)
            j = n if j < 0 else j
            cur.append(text[i + 1:j].replace("$", SQ_DOLLAR))
            in_word, i = True, j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                if text[j] == "\\" and j + 1 < n and text[j + 1] in '"\\$':
                    cur.append(text[j + 1])
                    j += 2
                    continue
                cur.append(text[j])
                j += 1
            in_word, i = True, j
        else:
            cur.append(c)
            in_word = True
        i += 1
    end_cmd()
    return cmds


def parse(cmds: list) -> list:
    """Nest ``{ ... }`` bodies; unbalanced braces are tolerated."""
    root, stack = [], []
    cur = root
    for w in cmds:
        if w == ["{"]:
            head = cur.pop() if cur and isinstance(cur[-1], list) else []
            blk = Block(head, [])
            cur.append(blk)
            if len(stack) < 64:
                stack.append(cur)
                cur = blk.body
        elif w == ["}"]:
            if stack:
                cur = stack.pop()
        elif w[-1] == "{" and len(w) > 1:
            blk = Block(w[:-1], [])
            cur.append(blk)
            if len(stack) < 64:
                stack.append(cur)
                cur = blk.body
        else:
            cur.append(w)
    return root


class _Eval:
    def __init__(self, esp_part: int, fs_uuid: str, label: str,
                 exists: Callable[[str], bool], read: Callable[[str], Optional[str]],
                 prefix: str, out: GrubBoot):
        self.esp_part, self.fs_uuid, self.label = esp_part, fs_uuid.upper(), label
        self.exists, self.read, self.out = exists, read, out
        esp_dev = f"hd0,gpt{esp_part}"
        self.env = {"root": esp_dev, "prefix": f"({esp_dev}){prefix}",
                    "cmdpath": f"({esp_dev})/EFI/BOOT"}
        self.entries, self.count = [], 0
        self.expanded, self.read_bytes, self.stopped = 0, 0, False

    def problem(self, text: str) -> None:
        if text not in self.out.problems and len(self.out.problems) < MAX_PROBLEMS:
            self.out.problems.append(text)

    def stop(self, why: str) -> None:
        self.problem(f"grub.cfg evaluation stopped: {why}")
        self.stopped = True

    def expand(self, word: str) -> str:
        """``word`` with $var / ${var} replaced, built piece by piece so that no value
        longer than MAX_VALUE is ever allocated."""
        if self.stopped:
            return word.replace(SQ_DOLLAR, "$")[:MAX_VALUE]
        parts, n, pos = [], 0, 0
        for m in VAR_RE.finditer(word):
            lit = word[pos:m.start()]
            value = self.env.get(m.group(1) or m.group(2), "")
            n += len(lit) + len(value)
            if n > MAX_VALUE:
                self.problem(f"a word expands to more than {MAX_VALUE} bytes; cut there")
                parts.append((lit + value)[:MAX_VALUE - (n - len(lit) - len(value))])
                pos = len(word)
                n = MAX_VALUE
                break
            parts += [lit, value]
            pos = m.end()
        tail = word[pos:][:max(0, MAX_VALUE - n)]
        parts.append(tail)
        n += len(tail)
        self.expanded += n
        if self.expanded > MAX_EXPANDED:
            self.stop(f"variable expansions exceed {MAX_EXPANDED} bytes in all")
        return "".join(parts).replace(SQ_DOLLAR, "$")

    def setvar(self, name: str, value: str) -> None:
        if name not in self.env and len(self.env) >= MAX_VARS:
            self.problem(f"more than {MAX_VARS} variables; '{name[:40]}' and later ones ignored")
            return
        self.env[name[:256]] = value[:MAX_VALUE]

    def lex_text(self, text: str) -> list:
        """Commands of a config, counting what is read against MAX_READ."""
        text = text[:MAX_CFG]
        self.read_bytes += len(text)
        if self.read_bytes > MAX_READ:
            self.stop(f"more than {MAX_READ} bytes of configuration read (configfile/source)")
            return []
        return parse(lex(text))

    def device(self, dev: str) -> str:
        dev = dev.strip().strip("()")
        m = re.fullmatch(r"hd0,(?:gpt)?(\d+)", dev)
        if m and int(m.group(1)) == self.esp_part:
            return "esp"
        return dev or "unknown"

    def ref(self, cmd: str, raw: str) -> Ref:
        word = self.expand(raw)
        m = re.match(r"\(([^)]*)\)(.*)", word)
        dev, path = (m.group(1), m.group(2)) if m else (self.env.get("root", ""), word)
        return Ref(cmd, raw, self.device(dev), "/" + path.lstrip("/"), path.startswith("/"))

    def run(self, body: list, depth: int, collect: Optional[list] = None) -> None:
        for item in body:
            self.count += 1
            if self.count > MAX_COMMANDS:
                self.stop(f"more than {MAX_COMMANDS} commands")
            if self.stopped:
                return
            if isinstance(item, Block):
                self.block(item, depth, collect)
            else:
                self.command([self.expand(w) if i == 0 else w for i, w in enumerate(item)],
                             depth, collect)

    def block(self, blk: Block, depth: int, collect) -> None:
        kind = blk.head[0] if blk.head else ""
        if kind in ("menuentry", "submenu"):
            title = self.expand(blk.head[1]) if len(blk.head) > 1 else ""
            ids = [self.expand(blk.head[i + 1]) for i, w in enumerate(blk.head[:-1])
                   if w == "--id"]
            if kind == "menuentry":
                if len(self.entries) >= MAX_ENTRIES:
                    self.problem(f"more than {MAX_ENTRIES} menu entries; later ones ignored")
                    return
                self.entries.append((title, ids, blk.body))
            else:
                self.run(blk.body, depth, collect)
        elif kind != "function":
            self.run(blk.body, depth, collect)   # if/while bodies: scanned

    def command(self, w: list, depth: int, collect) -> None:
        cmd = w[0]
        if cmd == "set" and len(w) > 1 and "=" in w[1]:
            k, v = w[1].split("=", 1)
            self.setvar(k, self.expand(v))
        elif cmd == "search" or cmd.startswith("search."):
            self.search(cmd, [self.expand(x) for x in w[1:]])
        elif cmd in KERNEL_CMDS + INITRD_CMDS:
            files = [x for x in w[1:] if not x.startswith("--")]
            if cmd in KERNEL_CMDS:
                files = files[:1]
            refs = [self.ref(cmd, f) for f in files]
            if cmd in KERNEL_CMDS and refs:
                after = w[w.index(files[0]) + 1:]
                refs[0].args = " ".join(self.expand(x) for x in after)[:MAX_VALUE]
            if not refs:
                self.problem(f"'{cmd}' without a file")
            self.out.refs.extend(refs)
            if collect is not None:
                collect.extend(refs)
        elif cmd in ("configfile", "source") and len(w) > 1:
            r = self.ref(cmd, w[1])
            if not r.on_esp:
                if len(self.out.elsewhere) < MAX_PROBLEMS:
                    self.out.elsewhere.append(f"{cmd} {w[1][:200]} ({r.device[:200]})")
            elif depth >= MAX_DEPTH:
                self.problem(f"'{cmd}' nested deeper than {MAX_DEPTH}")
            else:
                text = self.read(r.path)
                if text is None:
                    self.problem(f"'{cmd} {w[1][:200]}': {r.path[:200]} not on the ESP")
                else:
                    if cmd == "configfile":
                        self.entries = []
                    self.run(self.lex_text(text), depth + 1, collect)

    def search(self, cmd: str, args: list) -> None:
        mode, var, values = "file", "root", []
        if cmd != "search":
            mode = cmd.split(".", 1)[1].replace("fs_", "")
        i = 0
        while i < len(args):
            a = args[i]
            if a in ("-f", "--file"):
                mode = "file"
            elif a in ("-u", "--fs-uuid"):
                mode = "uuid"
            elif a in ("-l", "--label"):
                mode = "label"
            elif a.startswith("--set="):
                var = a.split("=", 1)[1]
            elif a in ("--set", "-s") and i + 1 < len(args) and not args[i + 1].startswith("-"):
                var, i = args[i + 1], i + 1
            elif not a.startswith("-"):
                values.append(a)
            i += 1
        if cmd != "search" and len(values) > 1:
            var = values[1]
        if not values:
            return
        v = values[0]
        hit = ((mode == "file" and self.exists(v)) or (mode == "uuid" and v.upper() ==
               self.fs_uuid) or (mode == "label" and v == self.label))
        esp = f"hd0,gpt{self.esp_part}"
        self.setvar(var, esp if hit else f"device found by search --{mode} {v[:200]}")


def read_grub_cfg(text: str, cfg_path: str, *, esp_part: int, fs_uuid: str, label: str,
                  exists: Callable[[str], bool], read: Callable[[str], Optional[str]],
                  prefix: str = "/EFI/BOOT") -> GrubBoot:
    out = GrubBoot(cfg_path)
    ev = _Eval(esp_part, fs_uuid, label, exists, read, prefix, out)
    top = []
    ev.run(ev.lex_text(text), 0, top)
    entries, per_entry = list(ev.entries), []
    for _, _, body in entries:          # every entry's files must exist, not only the default
        saved, refs = dict(ev.env), []
        ev.run(body, 1, refs)
        ev.env = saved
        per_entry.append(refs)
        if ev.stopped:
            per_entry += [[] for _ in range(len(entries) - len(per_entry))]
            break
    if entries:
        idx = _default(ev, entries)
        out.entry_title, chosen = entries[idx][0], per_entry[idx]
    else:
        out.entry_title, chosen = "(top level)", top
    kernels = [r for r in chosen if r.cmd in KERNEL_CMDS]
    out.kernel = kernels[-1] if kernels else None
    out.initrds = [r for r in chosen if r.cmd in INITRD_CMDS]
    return out


def _default(ev: _Eval, entries: list) -> int:
    d = ev.env.get("default", "0").strip()
    if re.fullmatch("[0-9]{1,9}", d) and int(d) < len(entries):
        return int(d)
    for i, (title, ids, _) in enumerate(entries):
        if d and (title == d or d in ids):
            return i
    if d not in ("", "0"):
        ev.problem(f"default={d[:200]!r} matches no menu entry; using the first")
    return 0
