"""`python -m dart.lmeval`: runs, protocols and reports (see :func:`dart.lmeval.main`)."""

from . import main

main()
