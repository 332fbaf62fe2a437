"""Telemetry: one JSON object per line in metrics.jsonl (schema: specs/telemetry.schema.json),
mirrored to TensorBoard when asked."""

from swengine.telemetry.logger import MetricsLogger, read_events

__all__ = ["MetricsLogger", "read_events"]
