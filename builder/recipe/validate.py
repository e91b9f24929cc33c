"""Recipe text -> validated plain data: sandboxed Jinja2 rendering, YAML parsing with line
numbers, and validation against the schema table in recipe_schema.py.

Every error names the recipe file, the line, the field and what is allowed (RecipeError).
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Tuple

from builder.errors import RecipeError
from builder.recipe.schema import SCHEMA, MAX_DISK_BYTES

MAX_RECIPE_BYTES = 1024 * 1024           # recipe text, before and after rendering
MAX_YAML_NODES = 200_000                 # bounds alias expansion ("billion laughs")
_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024 ** 2, "mib": 1024 ** 2,
          "g": 1024 ** 3, "gib": 1024 ** 3, "t": 1024 ** 4, "tib": 1024 ** 4,
          "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "tb": 1000 ** 4}
SIZE_ALLOWED = ("a number of bytes, or a number with KiB, MiB, GiB, TiB (K, M, G, T mean the same "
                "binary units: 64M is 64 MiB) or KB, MB, GB, TB (powers of 1000)")


# --- helpers ------------------------------------------------------------------------
def parse_size(text: Any, *, file=None, line=None, field_name=None) -> int:
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise RecipeError(file, f"expected a size, got {text!r}", line=line, field=field_name, allowed=SIZE_ALLOWED)
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
        unit = m and _UNITS.get(m.group(2).lower())
        if not m or unit is None:
            raise RecipeError(file, f"cannot parse size {text!r}", line=line, field=field_name, allowed=SIZE_ALLOWED)
        value = int(float(m.group(1)) * unit) if "." in m.group(1) else int(m.group(1)) * unit
    if value > MAX_DISK_BYTES:
        raise RecipeError(file, f"size {text!r} is {value} bytes, more than the maximum "
                          f"{MAX_DISK_BYTES // 1024 ** 4} TiB ({MAX_DISK_BYTES} bytes)", line=line,
                          field=field_name, allowed=f"1 byte to {MAX_DISK_BYTES // 1024 ** 4} TiB")
    if value <= 0:
        raise RecipeError(file, f"size {text!r} is not positive", line=line, field=field_name,
                          allowed=f"1 byte to {MAX_DISK_BYTES // 1024 ** 4} TiB")
    return value


def _extract_vars_block(text: str, file) -> dict:
    """Read the top-level `vars:` mapping from the raw text, before any rendering."""
    import yaml
    lines = text.splitlines(keepends=True)
    for i, ln in enumerate(lines):
        if re.match(r"^vars\s*:", ln):
            block = [ln]
            for nxt in lines[i + 1:]:
                if nxt.strip() and not nxt[0].isspace() and not nxt.startswith("#"):
                    break
                block.append(nxt)
            snippet = "".join(block)
            if "{{" in snippet or "{%" in snippet or "{#" in snippet:
                raise RecipeError(file, "vars are literal values and are never templated", line=i + 1,
                                  field="vars", allowed="plain YAML scalars, lists and mappings")
            try:
                data = yaml.safe_load(snippet) or {}
            except yaml.YAMLError as exc:
                raise RecipeError(file, f"invalid YAML in vars: {_yaml_problem(exc)}", line=i + 1, field="vars")
            value = data.get("vars") if isinstance(data, dict) else None
            if value is None:
                return {}
            if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                raise RecipeError(file, "must be a mapping of names to values", line=i + 1, field="vars")
            return value
    return {}


def _yaml_error_line(exc, text: str):
    """(line, message) for a YAML syntax error. An unclosed quote or bracket is reported
    where it was opened (PyYAML's problem mark is then often past the end of the file)."""
    last = text.count("\n") + (0 if text.endswith("\n") else 1)
    problem = getattr(exc, "problem_mark", None)
    context, cmark = getattr(exc, "context", None) or "", getattr(exc, "context_mark", None)
    pline = min(problem.line + 1, max(last, 1)) if problem else None
    message = _yaml_problem(exc)
    if cmark is not None and ("quoted" in context or "flow" in context):
        cline = cmark.line + 1
        what = re.sub(r"^while (scanning|parsing) ", "", context)
        return cline, f"{what} opened on this line is not closed properly ({message} at line {pline})"
    return pline, message


def _yaml_problem(exc) -> str:
    return getattr(exc, "problem", None) or str(exc).splitlines()[0]


class ScalarSlots:
    """Jinja2 `finalize` hook for the recipe: a `{{ ... }}` whose value is text other than one
    plain word (letters, digits, `_ . + / -`) is written as a placeholder token and put back
    into its scalar after YAML parsing. A value from --set or ARMVM_VAR_ (a newline, `: `,
    `]`, a quote...) can therefore never add keys or items: it is always text inside the
    scalar it stands in. Plain words go in as is, so `512MiB`, `4096` and `true` keep their
    YAML meaning."""

    PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+/-]*\Z")

    def __init__(self):
        import secrets
        self.prefix = "armvmvar" + secrets.token_hex(8) + "n"
        self.table: dict = {}

    def __call__(self, value):
        if isinstance(value, str) and not self.PLAIN.match(value):
            token = f"{self.prefix}{len(self.table)}x"
            self.table[token] = str(value)
            return token
        return value

    def rendered_size(self, text: str) -> int:
        return len(text) + sum(len(v) - len(k) for k, v in self.table.items())


class _Substitute:
    def __init__(self, prefix: str, table: Mapping[str, str]):
        self.table = table
        self.pattern = re.compile(re.escape(prefix) + r"\d+x") if table else None

    def __call__(self, value):
        if self.pattern is None or not isinstance(value, str):
            return value
        return self.pattern.sub(lambda m: self.table.get(m.group(0), m.group(0)), value)


def render(text: str, variables: Mapping[str, Any], file):
    """Render the recipe text with Jinja2 in the bounded sandbox (builder.recipe.templating);
    undefined variables are errors. Returns (text, names the template reads, substitute)
    where substitute puts the values held back by ScalarSlots into parsed scalars.
    Text without template syntax is returned as is (and Jinja2 is not even imported)."""
    if "{{" not in text and "{%" not in text and "{#" not in text:
        return text, frozenset(), _Substitute("", {})
    from builder.recipe import templating
    slots = ScalarSlots()
    spec = templating.TemplateSpec(
        what="recipe template", max_bytes=MAX_RECIPE_BYTES,
        allowed_names=sorted(variables))
    result = templating.render(text, variables, spec, file=file, finalize=slots)
    return result.text, result.names_read, _Substitute(slots.prefix, result.extra or {})


def parse_yaml(text: str, file, substitute=None) -> Tuple[Any, dict]:
    """YAML -> (data, lines) where lines maps a field path tuple to its 1-based line.
    `substitute` (from render) puts template values back into scalars and keys."""
    sub = substitute or (lambda v: v)
    import yaml
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        line, message = _yaml_error_line(exc, text)
        raise RecipeError(file, f"malformed YAML: {message}", line=line)
    if root is None:
        raise RecipeError(file, "the recipe is empty", allowed="a YAML mapping with name, arch and disk")
    constructor = yaml.SafeLoader("")
    lines: dict = {}
    budget = [MAX_YAML_NODES]

    def build(node, path):
        budget[0] -= 1
        if budget[0] < 0:
            raise RecipeError(file, "the recipe has too many YAML nodes (alias expansion?)",
                              allowed=f"at most {MAX_YAML_NODES} nodes")
        lines[path] = node.start_mark.line + 1
        if isinstance(node, MappingNode):
            out = {}
            for knode, vnode in node.value:
                if not isinstance(knode, ScalarNode):
                    raise RecipeError(file, "mapping keys must be plain names (an unquoted '{{' in a value?)",
                                      line=knode.start_mark.line + 1, field=_dotted(path) or None)
                key = str(sub(constructor.construct_object(knode)))
                if key in out:
                    raise RecipeError(file, f"duplicate key '{key}'", line=knode.start_mark.line + 1,
                                      field=_dotted(path + (key,)))
                out[key] = build(vnode, path + (key,))
            return out
        if isinstance(node, SequenceNode):
            return [build(item, path + (i,)) for i, item in enumerate(node.value)]
        try:
            return sub(constructor.construct_object(node))
        except yaml.YAMLError as exc:
            raise RecipeError(file, f"bad value: {_yaml_problem(exc)}", line=lines[path], field=_dotted(path))
    return build(root, ()), lines


def bare_message(exc: RecipeError) -> str:
    """The bare message of a RecipeError (without its file/field prefix and allowed suffix)."""
    text = str(exc)
    prefix = f"{exc.file}" + (f":{exc.line}" if exc.line else "") + ": " + \
        (f"field '{exc.field}': " if exc.field else "")
    suffix = f" (allowed: {exc.allowed})" if exc.allowed else ""
    if text.startswith(prefix):
        text = text[len(prefix):]
    if suffix and text.endswith(suffix):
        text = text[:-len(suffix)]
    return text


def _dotted(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# --- validation against the schema table --------------------------------------------
_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "boolean": bool}


def validate(data: Any, lines: dict, file) -> None:
    _validate(data, SCHEMA, (), lines, file)


def _validate(value, schema, path, lines, file):
    if schema.get("x-kind") == "one-or-list" and isinstance(value, str):
        value = [value]                           # `sbom: spdx` means `sbom: [spdx]`
    line = lines.get(path)
    fname = _dotted(path) or "(top level)"
    t = schema.get("type")
    if t:
        ok = isinstance(value, _TYPES[t]) and not (t == "integer" and isinstance(value, bool))
        if t == "string" and schema.get("x-kind") == "size" and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise RecipeError(file, f"expected {_article(t)}, got {_typename(value)}", line=line, field=fname,
                              allowed=_allowed(schema))
    if "enum" in schema and value not in schema["enum"]:
        raise RecipeError(file, f"{value!r} is not allowed", line=line, field=fname,
                          allowed=", ".join(str(v) for v in schema["enum"]))
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            raise RecipeError(file, f"{value!r} does not have the allowed form", line=line, field=fname,
                              allowed=schema.get("description", schema["pattern"]))
        if len(value) > schema.get("maxLength", 1 << 30):
            raise RecipeError(file, "is too long", line=line, field=fname,
                              allowed=f"at most {schema['maxLength']} characters")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < schema.get("minimum", value) or value > schema.get("maximum", value):
            raise RecipeError(file, f"{value} is out of range", line=line, field=fname,
                              allowed=f"{schema.get('minimum')} to {schema.get('maximum')}")
    if schema.get("x-kind") == "size":
        parse_size(value, file=file, line=line, field_name=fname)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            for key in value:
                if key not in props:
                    raise RecipeError(file, f"unknown field '{key}'", line=lines.get(path + (key,)),
                                      field=_dotted(path + (key,)), allowed=", ".join(props) or "no fields")
        for key in schema.get("required", []):
            if key not in value:
                desc = props.get(key, {}).get("description", "")
                raise RecipeError(file, f"missing required field '{key}'" + (f" ({desc.rstrip('.')})" if desc else ""),
                                  line=line, field=_dotted(path + (key,)))
        if len(value) > schema.get("maxProperties", 1 << 30):
            raise RecipeError(file, "has too many entries", line=line, field=fname,
                              allowed=f"at most {schema['maxProperties']}")
        for key, sub in value.items():
            if key in props:
                _validate(sub, props[key], path + (key,), lines, file)
        if schema.get("x-kind") == "source":
            _check_source(value, path, lines, file)
    if isinstance(value, list):
        if len(value) > schema.get("maxItems", 1 << 30) or len(value) < schema.get("minItems", 0):
            raise RecipeError(file, f"has {len(value)} items", line=line, field=fname,
                              allowed=f"{schema.get('minItems', 0)} to {schema.get('maxItems', 'any')} items")
        for i, item in enumerate(value):
            _validate(item, schema.get("items", {}), path + (i,), lines, file)


def _check_source(value: dict, path, lines, file):
    kinds = [k for k in ("file", "url", "package") if k in value]
    fname = _dotted(path)
    if len(kinds) > 1:
        raise RecipeError(file, f"names more than one source ({', '.join(kinds)})", line=lines.get(path),
                          field=fname, allowed="exactly one of file, url (+sha256), package (+path)")
    if "url" in value and "sha256" not in value:
        raise RecipeError(file, "a url needs its sha256", line=lines.get(path), field=fname + ".sha256",
                          allowed="64 lower-case hex digits")
    if "sha256" in value and "url" not in value:
        raise RecipeError(file, "sha256 goes with url", line=lines.get(path), field=fname)
    if "path" in value and "package" not in value:
        raise RecipeError(file, "path goes with package", line=lines.get(path), field=fname)


def _article(t):
    return {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
            "boolean": "true or false"}[t]


def _typename(v):
    if v is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", int: "an integer", bool: "a boolean",
            float: "a number"}.get(type(v), type(v).__name__)


def _allowed(schema):
    if "enum" in schema:
        return ", ".join(str(v) for v in schema["enum"])
    if schema.get("x-kind") == "size":
        return SIZE_ALLOWED
    return schema.get("description")
