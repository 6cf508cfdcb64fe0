"""``python -m fedhello.cli``: the ``fedhello`` command."""

from fedhello.cli import main

raise SystemExit(main())
