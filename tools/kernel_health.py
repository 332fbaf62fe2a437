#!/usr/bin/env python
"""Compile every registered swkernels Triton kernel for sm_75/80/86/89/90 without a GPU and fail
(exit 1) if any config spills registers or exceeds the arch's shared memory.

    python tools/kernel_health.py [--arch 86] [--op silu_mul] [--json]
"""

import sys

from swkernels.health import main

if __name__ == "__main__":
    sys.exit(main())
