"""How a config is shown and compared: flattened to MLflow params, secrets masked, digested."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

SECRET_KEY = re.compile(r"pass(word)?|secret|token|api_?key|credential", re.IGNORECASE)
URL_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.\-]*://[^:/@\s]*):(?P<secret>[^@/\s]+)@", re.IGNORECASE
)
QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:pass(?:word)?|secret|token|api_?key|sig|signature)=)(?P<secret>[^&;\s]+)",
    re.IGNORECASE,
)
MASK = "***"


def mask_text(text: str) -> str:
    """A URL's password and secret query values replaced by ***: what MLflow and Prefect
    may show (postgresql+psycopg2://user:***@db/mlflow)."""
    text = URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return QUERY_SECRET.sub(lambda m: f"{m['head']}{MASK}", text)


def mask_secrets(node: Any, key: str = "") -> Any:
    """A copy of a config or manifest tree safe to publish: values under secret-looking keys
    masked whole, passwords inside URLs and query strings masked in place."""
    if isinstance(node, dict):
        return {k: mask_secrets(v, str(k)) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [mask_secrets(v, key) for v in node]
    if isinstance(node, str):
        return MASK if SECRET_KEY.search(key) and node else mask_text(node)
    return node


def config_digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
