"""``python -m mvit2_kernels.bench``: the same as the ``mvit2-bench`` console script."""

import sys

from .cli import main

sys.exit(main())
