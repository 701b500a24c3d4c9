"""One task of a multi-node srun step (tests/test_slurm.py): the rendezvous the trainer uses
(rlef_hpc.dist_env.rendezvous, from Slurm's variables alone), then a gloo all-gather of
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

from rlef_hpc import runtime
from rlef_hpc.dist_env import rendezvous

runtime.setup()
assert "SLURM_PROCID" in os.environ, "not an srun task"
r = rendezvous(os.environ)
dist.init_process_group(
    "gloo",
    init_method=f"tcp://{r['MASTER_ADDR']}:{r['MASTER_PORT']}",
    rank=int(r["RANK"]),
    world_size=int(r["WORLD_SIZE"]),
    timeout=timedelta(seconds=60),
)
node = os.environ["SLURMD_NODENAME"]
peers: list[str | None] = [None] * dist.get_world_size()
dist.all_gather_object(peers, node)
master = r["MASTER_ADDR"]
line = {
    "rank": dist.get_rank(),
    "node": node,
    "master": master,
    "master_ip": socket.gethostbyname(master),
    "port": int(r["MASTER_PORT"]),
    "peers": peers,
}
print(json.dumps(line), flush=True)
dist.destroy_process_group()
