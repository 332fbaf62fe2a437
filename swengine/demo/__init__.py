"""The embedded offline demo: a tiny world language, its base model, and a skill to teach it."""
