"""docs/configuration.md, generated from `FLConfig`: each section's class docstring, then one
table row per key (type, default, the field's docstring).

Regenerate with ``python -m fedtune.fl.config_reference > docs/configuration.md`` (or pass the
path as the argument); ``tests/test_docs.py`` fails while the file is stale.
"""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from fedtune.fl.config import FLConfig
from pydantic.fields import FieldInfo

COMMAND = "python -m fedtune.fl.config_reference > docs/configuration.md"

_DOC_LINK = re.compile(r"\bdocs/([a-z_]+\.md)\b")


def _markdown(text: str) -> str:
    """Docstring text as Markdown: ``code`` becomes `code`, docs/x.md becomes a link."""
    text = text.replace("``", "`")
    return _DOC_LINK.sub(r"[\1](\1)", text)


def _one_line(text: str) -> str:
    return " ".join(_markdown(text).split()).replace("|", "\\|")


def _value(value: Any) -> str:
    """A value as it is written in TOML."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", r"e\1\2", repr(value)).replace("e+", "e")
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return str(value)


def _bounded(name: str, metadata: list[Any]) -> str:
    """``name`` with its bounds: int ≥ 1, float > 0, 0 ≤ float < 1."""
    lower: tuple[str, Any] | None = None
    upper: tuple[str, Any] | None = None
    for m in metadata:  # annotated_types.Ge, Gt, Le, Lt
        for attr, op in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            bound = getattr(m, attr, None)
            if bound is not None:
                if attr in ("ge", "gt"):
                    lower = (op, bound)
                else:
                    upper = (op, bound)
    if lower and upper:
        flipped = "≤" if lower[0] == "≥" else "<"
        return f"{_value(lower[1])} {flipped} {name} {upper[0]} {_value(upper[1])}"
    if lower or upper:
        op, bound = lower or upper
        return f"{name} {op} {_value(bound)}"
    return name


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _alternatives(annotation: Any, metadata: list[Any]) -> list[str]:
    origin = get_origin(annotation)
    if origin is Literal:
        return [f"`{_value(v)}`" for v in get_args(annotation)]
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        items = [i for a in args if a is not type(None) for i in _alternatives(a, metadata)]
        return items + (["none"] if type(None) in args else [])
    if origin in (tuple, list):
        return [f"list of {_type(get_args(annotation)[0], [])}"]
    return [_bounded(getattr(annotation, "__name__", str(annotation)), metadata)]


def _type(annotation: Any, metadata: list[Any]) -> str:
    """An annotation in words: `"a"`, `"b"` or none; int ≥ 1; list of str."""
    return _join(_alternatives(annotation, metadata))


def _row(key: str, field: FieldInfo) -> str:
    cells = [
        f"`{key}`",
        _type(field.annotation, field.metadata),
        f"`{_value(field.default)}`",
        _one_line(field.description or ""),
    ]
    return "| " + " | ".join(cells) + " |"


def render() -> str:
    """The whole of docs/configuration.md."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the docstrings in `fl/config.py`; do not edit by hand. Regenerate with",
        f"`{COMMAND}`",
        "(`tests/test_docs.py` fails while this file is stale).",
        "",
        "One TOML file, one table per section; `fedtune run --config FILE.toml` reads it and",
        "`--set section.key=value` overrides single keys. Without a file every key has its",
        "default, which is the seed example (`configs/seed.toml` spells it out).",
        "`fedtune config` prints the effective configuration. An invalid key, value or",
        "combination stops the run before anything starts, with one line naming the key.",
    ]
    for section, section_field in FLConfig.model_fields.items():
        model = section_field.annotation
        lines += ["", f"## `[{section}]`", ""]
        doc = inspect.cleandoc(model.__doc__ or "")  # not getdoc: it would inherit BaseModel's
        if doc:
            lines += [_markdown(doc), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        lines += [_row(key, field) for key, field in model.model_fields.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv:
        Path(argv[0]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
