"""``python -m softprompts`` (also what ``torchrun -m softprompts`` runs)."""

import sys

from softprompts.cli import main

sys.exit(main())
