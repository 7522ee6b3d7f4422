"""The champion gate's rule, branch by branch (the end-to-end tests exercise both aliases on
real registrations: test_alerts keeps a deliberately worse run `challenger`, the structured
pruning test promotes a smaller model over the unpruned champion)."""

import pytest

from conf.schema import EvaluateConfig
from tasks.registry import decide, gate_markdown

CHAMPION = {"accuracy": 0.90, "latency_b256_ms": 1.0, "size_zstd_bytes": 800_000}


def candidate(**changes):
    return {**CHAMPION, **changes}


@pytest.mark.parametrize(
    "changes, objective, alias, says",
    [
        ({"accuracy": 0.88, "latency_b256_ms": 0.3}, "latency", "challenger", "worse by more than"),
        ({"accuracy": 0.895, "latency_b256_ms": 0.5}, "latency", "champion", "better batch-256"),
        ({"accuracy": 0.895, "latency_b256_ms": 0.95}, "latency", "challenger", "not better"),
        ({}, "latency", "challenger", "not better"),  # a tie keeps the champion
        ({"accuracy": 0.91, "latency_b256_ms": 1.05}, "latency", "champion", "more accurate"),
        ({"accuracy": 0.91, "latency_b256_ms": 1.5}, "latency", "challenger", "not better"),
        ({"accuracy": 0.895, "size_zstd_bytes": 300_000}, "size", "champion", "better zstd size"),
        ({"accuracy": 0.895, "size_zstd_bytes": 300_000}, "latency", "challenger", "not better"),
    ],
)
def test_the_gate_promotes_only_within_tolerance_and_better(changes, objective, alias, says):
    cfg = EvaluateConfig(objective=objective, max_accuracy_drop=0.01)
    decided, why = decide(candidate(**changes), CHAMPION, cfg)
    assert (decided, says in why) == (alias, True), why


def test_without_a_champion_or_its_figures_accuracy_decides():
    cfg = EvaluateConfig(max_accuracy_drop=0.01)
    assert decide(candidate(), None, cfg)[0] == "champion"
    old = {"accuracy": 0.90, "latency_b256_ms": None, "size_zstd_bytes": None}
    assert decide(candidate(accuracy=0.905), old, cfg)[0] == "champion"
    assert decide(candidate(accuracy=0.899), old, cfg)[0] == "challenger"


def test_the_gate_markdown_carries_the_numbers():
    cfg = EvaluateConfig(max_accuracy_drop=0.01)
    new = candidate(accuracy=0.895, latency_b256_ms=0.5)
    alias, why = decide(new, CHAMPION, cfg)
    text = gate_markdown(alias, why, new, CHAMPION, cfg)
    assert text.startswith("## Gate: `champion`")
    assert "| latency_b256_ms | 0.5 | 1 |" in text and "| accuracy | 0.895 | 0.9 |" in text
