"""``python -m hf_kvcache_plugin``: the ``hf-kvcache`` command."""

import sys

from .app.cli import main

sys.exit(main())
