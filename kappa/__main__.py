import sys

from kappa.ops.cli import main

sys.exit(main())
