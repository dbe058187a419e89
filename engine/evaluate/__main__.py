"""`python -m engine.evaluate`: see engine/evaluate/cli.py."""

import sys

from engine.evaluate.cli import main

sys.exit(main())
