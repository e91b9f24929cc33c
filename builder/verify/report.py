"""Check results and the report that ``armvm-build verify`` prints (table or JSON).

A check's ``result`` is one of pass / fail / warn / skip. A SHOULD requirement that is not
met is reported as ``warn`` (never ``fail``); ``skip`` means the verifier could not judge
(for example, another tool's image carries no kernel config), never that it passed. A skip
of a conditional requirement whose condition is absent (root.* on an image without a root
partition) has ``applicable`` False, and ``--strict`` does not count it.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Optional

from builder.errors import EXIT_FAILED, EXIT_OK

LEVELS = ("MUST", "SHOULD")
RESULTS = ("pass", "fail", "warn", "skip")


@dataclass(frozen=True)
class Check:
    id: str
    level: str          # 'MUST' | 'SHOULD'
    requirement: str
    source: str         # specification version + section
    result: str         # 'pass' | 'fail' | 'warn' | 'skip'
    detail: str
    applicable: bool = True     # False: a conditional check whose condition is absent

    def to_json(self) -> dict:
        return {"id": self.id, "level": self.level, "requirement": self.requirement,
                "source": self.source, "result": self.result, "detail": self.detail,
                "applicable": self.applicable}


@dataclass(frozen=True)
class Report:
    image: str
    arch: Optional[str]
    profile: str
    checks: tuple  # tuple[Check, ...]
    kernel_release: Optional[str] = None   # the booted kernel's release, when the chain tells

    def by_id(self) -> dict:
        return {c.id: c for c in self.checks}

    def summary(self) -> dict:
        counts = {r: 0 for r in RESULTS}
        for c in self.checks:
            counts[c.result] = counts.get(c.result, 0) + 1
        return {
            "counts": counts,
            "failed_must": [c.id for c in self.checks if c.level == "MUST" and c.result == "fail"],
            "warned": [c.id for c in self.checks if c.result in ("warn", "fail")
                       and c.level == "SHOULD"],
            "skipped": [c.id for c in self.checks if c.result == "skip"],
        }

    def exit_code(self, strict: bool = False) -> int:
        for c in self.checks:
            if c.result == "fail" and c.level == "MUST":
                return EXIT_FAILED
            if strict and (c.result in ("fail", "warn") or
                           (c.result == "skip" and c.applicable)):
                return EXIT_FAILED
        return EXIT_OK

    def to_json(self) -> dict:
        return {
            "image": self.image,
            "arch": self.arch,
            "profile": self.profile,
            "summary": self.summary(),
            "exit_code": self.exit_code(),
            "exit_code_strict": self.exit_code(strict=True),
            "checks": [c.to_json() for c in self.checks],
        }

    def format_table(self, width: int = 100) -> str:
        lines = [f"image:   {self.image}",
                 f"arch:    {self.arch or 'unknown'}",
                 f"profile: {self.profile}", ""]
        id_w = max([len(c.id) for c in self.checks] + [5])
        head = f"{'RESULT':<6}  {'LEVEL':<6}  {'CHECK':<{id_w}}  DETAIL"
        lines += [head, "-" * min(width, max(len(head), 40))]
        indent = " " * (6 + 2 + 6 + 2 + id_w + 2)
        detail_w = max(30, width - len(indent))
        for c in self.checks:
            wrapped = textwrap.wrap(c.detail or "-", detail_w) or ["-"]
            lines.append(f"{c.result.upper():<6}  {c.level:<6}  {c.id:<{id_w}}  {wrapped[0]}")
            lines += [indent + w for w in wrapped[1:]]
        s = self.summary()
        n = s["counts"]
        lines += ["", f"{n['pass']} passed, {n['fail']} failed, {n['warn']} warnings, "
                      f"{n['skip']} skipped"]
        if s["failed_must"]:
            lines.append("failed MUST: " + ", ".join(s["failed_must"]))
        return "\n".join(lines)
