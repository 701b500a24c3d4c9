"""Per-GPU memory plan of a config's layout (exit 1 if it does not fit); see --help."""

import sys

from rlef_hpc import runtime

if __name__ == "__main__":
    runtime.setup()
    from rlef_hpc.launch.plan import main

    sys.exit(main())
