"""``python -m dart`` runs the `dart` command."""

import sys

from .cli import main

sys.exit(main())
