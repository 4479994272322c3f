import sys

from kappa.cli import main

sys.exit(main())
