"""VRAM planner: an analytic memory model, a fake-tensor measuring harness that calibrates it, and a search."""
