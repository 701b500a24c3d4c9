"""One task of a multi-node srun step (tests/test_slurm.py): the rendezvous the trainer uses
(rlef_hpc.dist_env.adopt_slurm_env, from Slurm's variables alone), then a gloo all-gather of
every rank's node. Each task prints one JSON line:

    {"rank", "node" (SLURMD_NODENAME), "master" (MASTER_ADDR), "master_ip" (what it resolves
     to), "port", "peers" (every rank's node, by rank)}

srun --nodes=2 --ntasks-per-node=2 python tests/scripts/slurm_rendezvous.py
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta

import torch.distributed as dist

from rlef_hpc.dist_env import adopt_slurm_env

assert adopt_slurm_env(), "not an srun task"
dist.init_process_group("gloo", timeout=timedelta(seconds=60))
node = os.environ["SLURMD_NODENAME"]
peers: list[str | None] = [None] * dist.get_world_size()
dist.all_gather_object(peers, node)
master = os.environ["MASTER_ADDR"]
line = {
    "rank": dist.get_rank(),
    "node": node,
    "master": master,
    "master_ip": socket.gethostbyname(master),
    "port": int(os.environ["MASTER_PORT"]),
    "peers": peers,
}
print(json.dumps(line), flush=True)
dist.destroy_process_group()
