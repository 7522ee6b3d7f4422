"""Reading a config: YAML file, profile, `--set` overrides, ${ENV} references, validation."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from conf.schema.pipeline import PipelineConfig
from tasks.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).parent.parent / "pipeline.yaml"
PROFILES = Path(__file__).parent.parent / "profiles"


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (3 → int, [1,2] → list)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc})") from None


ENV_REFERENCE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_env(node: Any, key: str = "") -> Any:
    """Replace `${VAR}` / `${VAR:-default}` in string values, so endpoints and secrets
    come from the environment (or docker/.env), never from committed files."""
    if isinstance(node, dict):
        return {k: expand_env(v, f"{key}{k}.") for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, key) for v in node]
    if not isinstance(node, str):
        return node

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise ConfigError(
                f"'{key.rstrip('.')}' needs environment variable {name}; set it or give "
                f"a default as ${{{name}:-value}}"
            )
        return default

    expanded = ENV_REFERENCE.sub(substitute, node)
    return yaml.safe_load(expanded) if expanded != node and expanded.strip() else expanded


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; pass -c with a YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections, not {type(tree).__name__}"
        )
    return tree


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def profile_path(profile: str) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        return path
    found = PROFILES / f"{profile}.yaml"
    if not found.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ConfigError(f"profile '{profile}' not found in {PROFILES}; known profiles: {known}")
    return found


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, profile: str | None = None
) -> PipelineConfig:
    """Read YAML, lay a profile over it, expand ${ENV} references, apply `--set` overrides,
    validate. Raises ConfigError naming the key."""
    path = Path(path) if path else DEFAULT_CONFIG
    tree = read_yaml(path)
    source = str(path)
    if profile:
        tree = merge(tree, read_yaml(profile_path(profile)))
        source = f"{path} + profile {profile}"
    tree = expand_env(tree)
    for assignment in overrides or []:
        apply_override(tree, assignment)
    return validate_config(tree, source=source)


UNION_TAGS = {"int", "float", "str", "bool"}  # how pydantic names a union's plain members


def validate_config(tree: dict[str, Any], source: str = "config") -> PipelineConfig:
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        problems: dict[str, str] = {}
        for err in exc.errors():
            loc = err["loc"]
            # a union's member (`int | auto`): 'train.epochs.constrained-int' is 'train.epochs'
            tag = loc[-1] if loc else 0
            if isinstance(tag, str) and (not tag.isidentifier() or tag in UNION_TAGS):
                loc = loc[:-1]
            key = ".".join(str(p) for p in loc)
            message = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                problems[key] = f"unknown key '{key}' (check the spelling; see conf/pipeline.yaml)"
            elif not key or isinstance(err.get("input"), dict):  # a rule that names its keys
                problems[message] = message
            elif key in problems:  # another member of the same union
                problems[key] = problems[key].replace(
                    " (got", f", or {message.removeprefix('Input should be ')} (got", 1
                )
            else:
                problems[key] = f"'{key}': {message} (got {err.get('input')!r})"
        raise ConfigError(f"{source}: " + "; ".join(problems.values())) from None
