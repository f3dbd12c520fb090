"""Launch a training run from YAML configs.

    python deepy.py train.py configs/tiny.yml [more.yml ...] [--dry-run] [-d CONF_DIR]

Parses the command line, merges and validates the configs once (NeoXArgs), saves the resolved and the
original configs in the run directory, and starts the worker script on every rank through DeepSpeed's
launcher (single node, hostfile + pdsh/openmpi/mvapich/slurm, or srun tasks with deepspeed_slurm).
The steps live in megatron/launcher/.
"""

import sys

from megatron.launcher import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
