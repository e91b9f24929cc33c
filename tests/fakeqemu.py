"""A stand-in for qemu-system-* in tests: plays a plan (console text, pauses, a GRUB shell
that answers `echo $prefix`, a QMP server on the -qmp socket that powers off or ignores
system_powerdown) and records its arguments and pid.

install(bindir, plan_file) writes qemu-system-aarch64/-arm scripts that run this module.
Plan: a JSON list of steps, each one of
  {"out": "text"}            write to the console (stdout)
  {"sleep": seconds}
  {"grub": "(hd0,gpt1)/EFI/BOOT"}   print "grub> ", read a typed line, answer it
  {"qmp": "poweroff" | "ignore" | "second"}  serve QMP; on system_powerdown power off, do
                                  nothing, or power off on the second request only
  {"wait": seconds}          wait (QMP keeps being served); then go on
  {"exit": status}
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path


def install(bindir: Path, plan_file: Path, record_dir: Path) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    for name in ("qemu-system-aarch64", "qemu-system-arm"):
        p = bindir / name
        p.write_text(f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
                     f"import fakeqemu\nfakeqemu.main({str(plan_file)!r}, {str(record_dir)!r})\n")
        p.chmod(0o755)


def out(text: str) -> None:
    os.write(1, text.encode())


class Qmp(threading.Thread):
    def __init__(self, path: str, mode: str, powered_off: threading.Event):
        super().__init__(daemon=True)
        self.mode, self.powered_off = mode, powered_off
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(1)

    def run(self):
        while True:
            conn, _ = self.srv.accept()
            f = conn.makefile("rwb")
            f.write(json.dumps({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                                    "package": "fake"},
                                        "capabilities": []}}).encode() + b"\r\n")
            f.flush()
            for msg in _messages(conn):
                f.write(json.dumps({"return": {}, **({"id": msg["id"]} if "id" in msg else {})})
                        .encode() + b"\r\n")
                f.flush()
                if msg.get("execute") == "system_powerdown":
                    self.presses = getattr(self, "presses", 0) + 1
                    if self.mode == "poweroff" or (self.mode == "second" and self.presses >= 2):
                        self.powered_off.set()
            conn.close()


def _messages(conn):
    """JSON objects from a stream (QMP clients need not end them with a newline)."""
    buf, dec = "", json.JSONDecoder()
    while True:
        data = conn.recv(4096)
        if not data:
            return
        buf += data.decode()
        while buf.strip():
            try:
                msg, end = dec.raw_decode(buf.lstrip())
            except ValueError:
                break
            buf = buf.lstrip()[end:]
            yield msg


def main(plan_file: str, record_dir: str) -> None:
    args = sys.argv[1:]
    rec = Path(record_dir)
    (rec / "args").write_text("\n".join(args) + "\n")
    (rec / "pid").write_text(str(os.getpid()))
    with open(rec / "pids", "a") as f:
        f.write(f"{os.getpid()}\n")
    plan = json.loads(Path(plan_file).read_text())
    qmp_path = None
    if "-qmp" in args:
        qmp_path = args[args.index("-qmp") + 1].split(",")[0][len("unix:"):]
    powered_off = threading.Event()
    for step in plan:
        if "out" in step:
            out(step["out"])
        elif "sleep" in step:
            time.sleep(step["sleep"])
        elif "grub" in step:
            out("grub> ")
            typed = b""
            while not typed.endswith((b"\r", b"\n")):     # a serial terminal sends CR
                c = os.read(0, 1)
                if not c:
                    break
                typed += c
            typed = typed.decode()
            out(typed.replace("\r", "") + "\r\n")      # GRUB echoes what is typed
            if "$prefix" in typed:
                out(f"ARMVM-GRUB prefix={step['grub']} cmdpath={step['grub']}\r\n")
            out("grub> ")
        elif "qmp" in step:
            Qmp(qmp_path, step["qmp"], powered_off).start()
        elif "wait" in step:
            if powered_off.wait(step["wait"]):
                out("\r\n[   50.000000] reboot: Power down\r\n")
                sys.exit(0)
        elif "exit" in step:
            sys.exit(step["exit"])


def environment(tmp_path) -> tuple:
    """The fake QEMU on a private PATH, fake firmware files and a private TMPDIR under
    tmp_path: returns (env additions, plan file, record folder)."""
    bindir, rec, tmp = tmp_path / "bin", tmp_path / "rec", tmp_path / "tmp"
    rec.mkdir()
    tmp.mkdir()
    plan_file = tmp_path / "plan.json"
    install(bindir, plan_file, rec)
    code, vars_ = tmp_path / "CODE.fd", tmp_path / "VARS.fd"
    code.write_bytes(b"code")
    vars_.write_bytes(b"vars")
    env = {"ARMVM_FIRMWARE_CODE": str(code), "ARMVM_FIRMWARE_VARS": str(vars_),
           "PATH": f"{bindir}:{os.environ['PATH']}", "TMPDIR": str(tmp)}
    return env, plan_file, rec
