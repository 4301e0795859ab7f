"""`python -m consumers …`: an alias of `python -m ops …` (the `promptcache` command), kept for
deployments that run the processes this way."""

import sys

from ops.cli import main

sys.exit(main())
