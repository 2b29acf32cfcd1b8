"""``python -m cbam_dsa.cli`` (and ``torchrun -m cbam_dsa.cli``): the ``cbam-dsa`` command."""

import sys

from . import main

sys.exit(main())
