import gc
import sys

# No collections while a command imports its modules and wires its app: they leave about 110,000
# objects that live as long as the process, and every collection rescanned them (35 ms of each
# start). The command turns the collector on once they exist (kappa.processes.relax_garbage_collector).
gc.disable()

from kappa.ops.cli import main  # noqa: E402

sys.exit(main())
