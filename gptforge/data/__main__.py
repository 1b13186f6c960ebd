"""``python -m gptforge.data prepare|tokenizer|verify ...``: see gptforge/data/cli.py."""

import sys

from gptforge.data.cli import main

sys.exit(main())
