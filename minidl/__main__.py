"""``python -m minidl ...`` is the ``minidl`` command (minidl/cli/)."""
import sys

from .cli import main

sys.exit(main())
