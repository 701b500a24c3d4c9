"""Submit an RLEF run to Slurm (training, rollout workers, evaluation); see --help."""

import sys

from rlef_hpc import runtime

if __name__ == "__main__":
    runtime.setup()
    from rlef_hpc.launch.submit import main

    sys.exit(main())
