"""One bounded Jinja2 renderer for every template a recipe controls: the recipe itself,
grub.cfg (`bootloader.config`) and /init (`initramfs.init`).

Templates are untrusted input, and Jinja2 does work before any timer could run: its
optimizer folds constants at compile time (`{{ "a" * 3000000000 }}` allocates while
compiling). So the template is compiled *and* rendered in a forked child process with an
address-space limit (RLIMIT_AS: what it already maps plus MAX_TEMPLATE_MEMORY) and a
wall-clock deadline (the parent kills it). Inside the child a sandbox with the optimizer
off refuses the obvious bombs with a clear message first: huge numbers, repetitions,
`%`-formatting widths, `+` concatenations and ranges. The rendered text is capped while
it is generated. The child sends back JSON (never a pickle).

Errors name the template file, the line inside it and the variables it may use.
"""
from __future__ import annotations

import gc
import json
import os
import re
import select
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from builder.errors import ArmvmError, RecipeError

MAX_TEMPLATE_MEMORY = 256 * 1024 * 1024   # address space a template may add (compile + render)
TEMPLATE_SECONDS = 5.0                    # wall clock for compile + render
MAX_TEMPLATE_INT = 1_000_000              # largest number a template may compute with
MAX_TEMPLATE_RANGE = 10_000               # items of range()
MAX_TEMPLATE_SOURCE = 1024 * 1024         # template text

# Only size-preserving filters and str methods (no str.format: it reaches attributes).
SAFE_FILTERS = frozenset([
    "default", "d", "first", "last", "length", "count", "join", "int", "float", "string",
    "lower", "upper", "trim", "title", "capitalize", "list", "sort", "unique", "select",
    "reject", "map", "selectattr", "rejectattr", "min", "max", "sum", "abs", "round",
    "tojson", "reverse", "truncate", "items", "dictsort", "batch", "slice"])
SAFE_STR_METHODS = frozenset([
    "lower", "upper", "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines",
    "startswith", "endswith", "title", "capitalize", "casefold", "find", "rfind", "count",
    "partition", "rpartition", "isdigit", "isalpha", "isalnum", "isspace"])
_FORMAT_WIDTH = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class _Refused(Exception):
    """A bound the sandbox enforces (turned into the caller's error with the line)."""


def _make_sandbox(max_bytes: int):
    from jinja2.sandbox import SandboxedEnvironment

    def check_ints(values):
        for v in values:
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_TEMPLATE_INT:
                raise _Refused(f"the number {v} is too large: it exceeds {MAX_TEMPLATE_INT}")

    def bounded_range(*args):
        check_ints(args)
        r = range(*args)
        if len(r) > MAX_TEMPLATE_RANGE:
            raise _Refused(f"range of {len(r)} items is too large: it exceeds {MAX_TEMPLATE_RANGE}")
        return r

    def size(v) -> int:
        return len(v) if isinstance(v, (str, bytes, list, tuple)) else 0

    class BoundedSandbox(SandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**", "%", "+", "//", "/", "-"])

        def __init__(self, **options):
            super().__init__(optimized=False, **options)
            self.filters = {k: f for k, f in self.filters.items() if k in SAFE_FILTERS}
            self.globals = {k: v for k, v in self.globals.items() if k != "lipsum"}
            self.globals["range"] = bounded_range

        def wrap_str_format(self, value):
            return None

        def is_safe_attribute(self, obj, attr, value) -> bool:
            if isinstance(obj, str) and attr not in SAFE_STR_METHODS:
                return False
            return super().is_safe_attribute(obj, attr, value)

        def call_binop(self, context, operator, left, right):
            check_ints((left, right))
            if operator == "**" and isinstance(right, int) and right > 64:
                raise _Refused(f"exponent {right} is too large: it exceeds 64")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if size(seq) and isinstance(n, int) and size(seq) * n > max_bytes:
                        raise _Refused(f"'*' would build {size(seq) * n} items: too large "
                                      f"(it exceeds {max_bytes})")
            if operator == "+" and size(left) + size(right) > max_bytes:
                raise _Refused(f"'+' would build {size(left) + size(right)} items: too large "
                              f"(it exceeds {max_bytes})")
            if operator == "%" and isinstance(left, str):
                for m in _FORMAT_WIDTH.finditer(left):
                    for width in m.groups():
                        if width == "*" or (width and int(width) > max_bytes):
                            raise _Refused(f"'%' format width {width} is too large: it exceeds {max_bytes}")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
            check_ints(list(args) + list(kwargs.values()))
            return super().call(__context, __obj, *args, **kwargs)

    return BoundedSandbox


@dataclass
class Rendered:
    text: str
    names_read: frozenset           # variables the template refers to (undeclared names)
    extra: Any = None               # whatever `finalize.table` held (JSON-able)


@dataclass
class TemplateSpec:
    """How one kind of template is rendered and described in errors."""
    what: str                                   # "recipe template", "grub.cfg template", ...
    max_bytes: int                              # rendered size cap
    env_options: Mapping[str, Any] = field(default_factory=dict)
    filters: Mapping[str, Callable] = field(default_factory=dict)
    allowed_names: Optional[Sequence[str]] = None   # listed on an undefined-variable error
    field: Optional[str] = None                 # recipe field naming this template


def render(source: str, variables: Mapping[str, Any], spec: TemplateSpec, *, file,
           finalize: Optional[Callable] = None) -> Rendered:
    """Compile and render `source` in a bounded child; RecipeError(file, line) on failure."""
    if len(source) > MAX_TEMPLATE_SOURCE:
        raise RecipeError(file, f"{spec.what} is {len(source)} characters", field=spec.field,
                          allowed=f"at most {MAX_TEMPLATE_SOURCE}")
    import jinja2.sandbox  # noqa: F401  (imported before the fork, so the child need not)
    import jinja2.meta  # noqa: F401
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:                                    # child: never returns
        gc.disable()                                # a collection would touch (copy) every page
        os.close(read_fd)
        status = 0
        try:
            payload = _child(source, variables, spec, finalize)
        except BaseException as exc:                # noqa: BLE001 (report everything)
            payload = {"error": f"{type(exc).__name__}: {exc}", "line": None}
            status = 1
        try:
            data = json.dumps(payload).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view):]
        finally:
            os._exit(status)
    os.close(write_fd)
    return _collect(pid, read_fd, spec, file)


def _collect(pid: int, read_fd: int, spec: TemplateSpec, file) -> Rendered:
    deadline = time.monotonic() + TEMPLATE_SECONDS
    chunks, timed_out, finished = [], False, False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([read_fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 20)
            if not chunk:
                finished = True
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        if not finished:                            # timed out, or interrupted (^C)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        raise RecipeError(file, f"{spec.what} took longer than {TEMPLATE_SECONDS:g} s to compile and render",
                          field=spec.field, allowed="templates that render quickly")
    try:
        payload = json.loads(b"".join(chunks))
    except ValueError:
        sig = -os.waitstatus_to_exitcode(status) if os.WIFSIGNALED(status) else None
        raise RecipeError(file, f"{spec.what} could not be rendered: the renderer "
                          + (f"was killed by signal {sig}" if sig else "ran out of memory"),
                          field=spec.field,
                          allowed=f"templates that need at most {MAX_TEMPLATE_MEMORY >> 20} MiB") from None
    if "error" in payload:
        raise RecipeError(file, f"{spec.what}: {payload['error']}", line=payload.get("line"),
                          field=spec.field, allowed=payload.get("allowed"))
    return Rendered(payload["text"], frozenset(payload["names"]), payload.get("extra"))


def _limit_memory() -> None:
    import resource
    vm = 0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    vm = int(line.split()[1]) * 1024
    except OSError:
        pass
    want = vm + MAX_TEMPLATE_MEMORY
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft == resource.RLIM_INFINITY or want < soft:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    cpu = int(TEMPLATE_SECONDS) + 2
    soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard == resource.RLIM_INFINITY or cpu < hard:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, hard))


def _child(source: str, variables, spec: TemplateSpec, finalize) -> dict:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles ^C
    _limit_memory()
    import jinja2
    from jinja2 import meta
    env_cls = _make_sandbox(spec.max_bytes)
    options = dict(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    options.update(spec.env_options)
    if finalize is not None:
        options["finalize"] = finalize
    try:
        env = env_cls(**options)
        env.filters.update(spec.filters)
        names = sorted(meta.find_undeclared_variables(env.parse(source)))
        template = env.from_string(source)
        out, size = [], 0
        for chunk in template.generate(**variables):
            size += len(chunk)
            if size > spec.max_bytes:
                raise _Refused(f"renders to more than {spec.max_bytes} bytes (exceeds the cap)")
            out.append(chunk)
        text = "".join(out)
        if finalize is not None and getattr(finalize, "rendered_size", None) is not None:
            if finalize.rendered_size(text) > spec.max_bytes:
                raise _Refused(f"renders to more than {spec.max_bytes} bytes")
    except jinja2.TemplateSyntaxError as exc:
        return {"error": f"TemplateSyntaxError: {exc.message}", "line": exc.lineno}
    except jinja2.UndefinedError as exc:
        allowed = ", ".join(spec.allowed_names) if spec.allowed_names is not None else None
        return {"error": f"UndefinedError: {exc.message}", "line": _template_line(exc),
                "allowed": f"the variables this template sees: {allowed or 'none'}"
                if allowed is not None else None}
    except jinja2.exceptions.SecurityError as exc:
        return {"error": f"refused by the sandbox (SecurityError): {exc}", "line": _template_line(exc)}
    except _Refused as exc:
        return {"error": f"refused: {exc}", "line": _template_line(exc)}
    except MemoryError as exc:
        return {"error": f"needs more than {MAX_TEMPLATE_MEMORY >> 20} MiB of memory", "line": _template_line(exc)}
    except RecursionError as exc:
        return {"error": "nests too deeply", "line": _template_line(exc)}
    except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, AttributeError,
            LookupError, ArmvmError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "line": _template_line(exc)}
    return {"text": text, "names": names, "extra": getattr(finalize, "table", None)}


def _template_line(exc) -> Optional[int]:
    tb = exc.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line
