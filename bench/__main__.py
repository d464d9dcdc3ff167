"""`python -m bench`: run the whole suite."""

from .run import main

raise SystemExit(main())
