"""`python -m deepspec_plugin.cli ...` (what torchrun runs) is `dspec ...`."""

import sys

from deepspec_plugin.cli.app import main

sys.exit(main())
