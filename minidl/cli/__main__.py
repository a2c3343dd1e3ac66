"""``python -m minidl.cli ...``: the same as ``python -m minidl ...``."""
import sys

from . import main

sys.exit(main())
