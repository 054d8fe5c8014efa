"""Inference statistics in the shape of Triton's statistics extension, read from the counters
every worker process writes (:class:`~app.observability.metrics.StatisticsCounters`), so that
whichever worker answers reports the totals of all (each worker's last ``FLUSH_S`` aside)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from app.observability.metrics import PHASES, STATISTICS, Metrics, StatisticsCounters

Duration = dict[str, int]
"""``{"count": requests or passes, "ns": their total nanoseconds}``."""
_UNUSED = ("cache_hit", "cache_miss")
"""Triton's statistics of a response cache, which modelport has not: always zero."""


def model_statistics(
    metrics: Metrics, versions: Iterable[tuple[str, str]], *, only_given: bool
) -> list[dict[str, Any]]:
    """One entry per model version: ``versions`` (model, version) pairs, and unless
    ``only_given``, every other version of those models that has counted something."""
    counted = _counted(metrics)
    wanted = dict.fromkeys(versions)
    if not only_given:
        models = {model for model, _ in wanted}
        wanted |= dict.fromkeys(sorted(key for key in counted if key[0] in models))
    return [_entry(model, version, counted.get((model, version))) for model, version in wanted]


class _Counted:
    """What the counters hold for one model version."""

    def __init__(self) -> None:
        self.requests: dict[str, Duration] = defaultdict(_zero)
        self.passes: dict[int, dict[str, Duration]] = defaultdict(lambda: defaultdict(_zero))
        self.last_inference = 0.0


def _zero() -> Duration:
    return {"count": 0, "ns": 0}


def _counted(metrics: Metrics) -> dict[tuple[str, str], _Counted]:
    metrics.flush()  # what this worker counted since its last flush
    names = {
        f"{StatisticsCounters.COUNTS}_total": ("requests", "count"),
        f"{StatisticsCounters.SECONDS}_total": ("requests", "ns"),
        f"{StatisticsCounters.PASSES}_total": ("passes", "count"),
        f"{StatisticsCounters.PASS_SECONDS}_total": ("passes", "ns"),
        StatisticsCounters.LAST_INFERENCE: ("last", ""),
    }
    found: dict[tuple[str, str], _Counted] = defaultdict(_Counted)
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name not in names:
                continue
            kind, field = names[sample.name]
            labels = sample.labels
            counted = found[labels["model"], labels["version"]]
            value = int(sample.value * 1e9) if field == "ns" else int(sample.value)
            if kind == "requests":
                counted.requests[labels["statistic"]][field] += value
            elif kind == "passes":
                counted.passes[int(labels["batch_size"])][labels["phase"]][field] += value
            else:
                counted.last_inference = max(counted.last_inference, sample.value)
    return found


def _entry(model: str, version: str, counted: _Counted | None) -> dict[str, Any]:
    counted = counted or _Counted()
    passes = {size: phases["compute_infer"]["count"] for size, phases in counted.passes.items()}
    return {
        "name": model,
        "version": version,
        "last_inference": int(counted.last_inference * 1000),
        "inference_count": sum(size * count for size, count in passes.items()),
        "execution_count": sum(passes.values()),
        "inference_stats": {
            **{name: dict(counted.requests[name]) for name in STATISTICS},
            **{name: _zero() for name in _UNUSED},
        },
        "batch_stats": [
            {"batch_size": size, **{phase: dict(phases[phase]) for phase in PHASES}}
            for size, phases in sorted(counted.passes.items())
        ],
    }
