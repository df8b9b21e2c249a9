"""``python -m mvit2_kernels.bench``: the same as the ``mvit2-bench`` console script."""

from .cli import main

raise SystemExit(main())
