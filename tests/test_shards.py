"""Trajectory shards (the disaggregated layout's hand-off) and the Slurm -> torch.distributed
rendezvous: pure functions and files, no cluster needed."""

from __future__ import annotations

import os

import pytest

from rlef_hpc.data.trajectory import Trajectory
from rlef_hpc.dist_env import expand_hostlist, rendezvous_port, torch_env_from_slurm
from rlef_hpc.rollout.shards import ShardStore, load_shards


def episodes(tag: str, n: int = 2) -> list[Trajectory]:
    return [Trajectory(f"{tag}-{i}", "python", [1, 2, 3], [], False) for i in range(n)]


def test_claims_take_shards_once_oldest_first_and_set_stale_ones_aside(tmp_path):
    store = ShardStore(tmp_path)
    store.write(0, 0, version=0, trajectories=episodes("a"))
    store.write(1, 0, version=2, trajectories=episodes("b"))
    store.write(0, 1, version=3, trajectories=episodes("c"))
    # Iteration 4 trains policy version 3; with staleness 1 it takes versions >= 2.
    claimed = store.claim(4, count=2, min_version=2, timeout_s=1)
    assert [p.name for p in claimed] == ["w001-s000000-v00000002.pt", "w000-s000001-v00000003.pt"]
    assert [v for v, _ in load_shards(claimed)] == [2, 3]
    assert [t.problem for _, ts in load_shards(claimed) for t in ts] == ["b-0", "b-1", "c-0", "c-1"]
    assert store.audit() == {"pending": 0, "stale": 1, "claimed": 2}


def test_a_restarted_trainer_gets_back_what_its_iteration_had_claimed(tmp_path):
    store = ShardStore(tmp_path)
    for seq in range(3):
        store.write(0, seq, version=0, trajectories=episodes(str(seq)))
    first = store.claim(1, count=2, min_version=0, timeout_s=1)
    # The trainer dies before its checkpoint of iteration 1; the restarted one asks again.
    again = ShardStore(tmp_path).claim(1, count=2, min_version=0, timeout_s=1)
    assert again == first
    assert store.audit() == {"pending": 1, "stale": 0, "claimed": 2}


def test_a_restarted_worker_continues_its_numbering_and_drops_its_partial_shard(tmp_path):
    store = ShardStore(tmp_path)
    store.write(3, 0, version=0, trajectories=episodes("x"))
    store.write(3, 1, version=0, trajectories=episodes("y"))
    store.claim(1, count=1, min_version=0, timeout_s=1)
    partial = store.pending / ".tmp-w003-s000002-v00000000.pt.123"  # pid 123 was killed
    partial.write_bytes(b"half a shard")
    assert store.next_seq(3) == 2
    assert not partial.exists()
    assert store.next_seq(4) == 0


def test_audit_catches_a_shard_twice_and_a_lost_one(tmp_path):
    store = ShardStore(tmp_path)
    store.write(0, 0, version=0, trajectories=episodes("x"))
    store.write(0, 2, version=0, trajectories=episodes("z"))
    with pytest.raises(AssertionError, match=r"shards \[1\] lost"):
        store.audit()
    store.write(0, 1, version=0, trajectories=episodes("y"))
    twin = store.iteration_dir(1)
    twin.mkdir(parents=True)
    (twin / "w000-s000001-v00000001.pt").write_bytes(b"")
    with pytest.raises(AssertionError, match="twice"):
        store.audit()


def test_claim_gives_up_with_a_message_when_no_worker_writes(tmp_path):
    with pytest.raises(TimeoutError, match="rollout workers running"):
        ShardStore(tmp_path).claim(1, count=1, min_version=0, timeout_s=0.3, poll_s=0.05)


def test_slurm_host_lists_expand_as_scontrol_does():
    assert expand_hostlist("gpu[001-003,007],login1") == [
        "gpu001",
        "gpu002",
        "gpu003",
        "gpu007",
        "login1",
    ]
    assert expand_hostlist("n[9-11]") == ["n9", "n10", "n11"]
    assert expand_hostlist("localhost") == ["localhost"]


def test_torch_rendezvous_from_an_srun_task():
    env = {
        "SLURM_PROCID": "13",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "h100-[07-08]",
    }
    assert torch_env_from_slurm(env) == {
        "RANK": "13",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "MASTER_ADDR": "h100-07",
        "MASTER_PORT": str(rendezvous_port("4242")),
    }
    assert torch_env_from_slurm({k: v for k, v in os.environ.items() if "SLURM" not in k}) == {}
    # A requeued job (same id) meets on the same port; another job elsewhere.
    assert rendezvous_port("4242") != rendezvous_port("4243")
    # Below the kernel's ephemeral ports, which srun (listening) may hold on the first node.
    assert all(20000 <= rendezvous_port(str(j)) < 32768 for j in range(0, 10**7, 9973))
