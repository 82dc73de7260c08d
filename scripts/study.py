#!/usr/bin/env python
"""The tuning study (perplexity, switch streams, greedy continuations over a grid of DART
settings): ``python -m dart.study``, kept here for the commands docs/RESULTS.md cites.

    python scripts/study.py --split calibration --max-tokens 2048 --out results/study
"""

import sys

from dart.study import main

if __name__ == "__main__":
    sys.exit(main())
