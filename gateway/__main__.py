"""`python -m gateway` is the same as the `tower-gateway` command."""

import sys

from gateway.cli import main

sys.exit(main())
