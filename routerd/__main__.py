"""`python -m routerd` is the `routerd` command."""

from routerd.cli import main

raise SystemExit(main())
