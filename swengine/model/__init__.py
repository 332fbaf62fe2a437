"""Model configs, loading and patching."""
