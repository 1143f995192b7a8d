"""`python -m gateway` is the same as the `tower-gateway` command."""

import sys

from gateway.cli.main import main

sys.exit(main())
