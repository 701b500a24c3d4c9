"""Submit an RLEF run to Slurm (training, rollout workers, evaluation); see --help."""

import sys

from rlef_hpc.launch.submit import main

if __name__ == "__main__":
    sys.exit(main())
