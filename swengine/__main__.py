"""``python -m swengine``: the ``swengine`` command (how torchrun starts each rank)."""

from swengine.cli import main

main()
