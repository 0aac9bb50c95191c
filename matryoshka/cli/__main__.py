"""``python -m matryoshka.cli ...`` (what ``torchrun -m matryoshka.cli train`` runs)."""

import sys

from .main import main

sys.exit(main())
