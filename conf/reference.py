"""The configuration reference (docs/configuration.md), generated from the schema's fields:
their defaults, allowed values, bounds and descriptions. `make docs` writes it; a test fails
when the committed page differs from what the schema says.

    python -m conf.reference > docs/configuration.md
"""

from __future__ import annotations

import json
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel

from conf.schema import PipelineConfig, Section

HEADER = """# Configuration reference

Generated from `conf/schema/` by `python -m conf.reference` (`make docs`); a test fails
when this page is stale. Every key is set in YAML (`conf/pipeline.yaml`, a profile in
`conf/profiles/`) or on the command line (`accelflow run --set section.key=value`), validated
before any work starts (an unknown key or a bad value is an error naming it), and logged to
MLflow as the parameter `section.key`.
"""


def allowed(annotation: Any) -> str:
    """The values a field takes, in words: a Literal's choices, a type's name."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{v}`" for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(allowed(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "`null`"
    if origin is Annotated:  # a bounded type inside a union or a list: int ≥ 0
        kind, *constraints = typing.get_args(annotation)
        metadata = [m for c in constraints for m in getattr(c, "metadata", [c])]
        limits = bounds(types.SimpleNamespace(metadata=metadata))
        return kind.__name__ + (f" {limits}" if limits else "")
    if origin is list and typing.get_origin(typing.get_args(annotation)[0]) is Annotated:
        return f"list of {allowed(typing.get_args(annotation)[0])}"
    if origin is not None:  # list[int], dict[str, ...]
        return f"`{str(annotation).replace('typing.', '')}`"
    return getattr(annotation, "__name__", str(annotation))


def bounds(field) -> str:
    words = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return ", ".join(
        f"{words[name]} {getattr(m, name)}"
        for m in field.metadata
        for name in words
        if getattr(m, name, None) is not None
    )


def as_json(value: Any) -> str:
    return json.dumps(
        value, default=lambda o: o.model_dump(mode="json") if isinstance(o, BaseModel) else str(o)
    )


def default(field) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, dict) and len(as_json(value)) > 60:
        return f"{len(value)} entries (see `conf/pipeline.yaml`)"
    return f"`{as_json(value)}`"


def section_table(name: str, model: type[Section]) -> list[str]:
    lines = [f"## `{name}`", ""]
    if model.__doc__ and model.__doc__ != Section.__doc__:
        lines += [" ".join(model.__doc__.split()), ""]
    lines += ["| key | default | values | description |", "|---|---|---|---|"]
    return [*lines, *rows(name, model), ""]


def rows(prefix: str, model: type[Section]) -> list[str]:
    """One row per key; a nested section (compress.distill) gives one row per key inside."""
    lines = []
    for key, field in model.model_fields.items():
        inner = field.annotation
        if isinstance(inner, type) and issubclass(inner, Section):
            lines += rows(f"{prefix}.{key}", inner)
            continue
        values = " ".join(filter(None, [allowed(field.annotation), bounds(field)]))
        text = (field.description or "").replace("|", "\\|").replace("<", "&lt;")
        lines.append(f"| `{prefix}.{key}` | {default(field)} | {values} | {text} |")
    return lines


def render() -> str:
    lines = [HEADER]
    top = []
    for name, field in PipelineConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, Section):
            lines += section_table(name, model)
        else:
            top.append(
                f"- `{name}` (default {default(field)}): {field.description.replace('<', '&lt;')}"
            )
    return "\n".join([lines[0], *top, "", *lines[1:]]).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
