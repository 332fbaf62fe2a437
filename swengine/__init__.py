"""swengine: a lean LoRA/QLoRA fine-tuning engine for one consumer GPU."""

__version__ = "0.1.0"

# Every JSON output (plan, doctor, eval, CLI errors, each metrics.jsonl line) carries this; the
# schemas in specs/ pin it. Bump it when a field changes meaning or goes away.
SCHEMA_VERSION = 1
