"""`python -m launcher ...` == `rgan ...` (handy under `torchrun -m` or `deepspeed --module`)."""

import sys

from launcher.cli import main

sys.exit(main())
