"""``python -m pbkv``: the same as the ``pbkv`` command."""

from pbkv.cli import main

raise SystemExit(main())
