"""tools/submit.py: a config in, Slurm jobs out (through submitit).

    python tools/submit.py CONFIG [KEY=VALUE ...] [--layout colocated|disaggregated] [--dry-run]
    python tools/submit.py status RUN_DIR
    python tools/submit.py cancel RUN_DIR

Layouts (rollout.layout):
- colocated (default): one job of parallel.world_size tasks; each tensor-parallel group of
  trainer ranks has its own vLLM engine on its GPUs, at the trainer's TP size (rollout and
  training alternate on the same devices; at TP 4 x DP 2 one node of 8 GPUs trains Llama 3.1
  8B: configs/llama3_8b_1node.yaml).
- disaggregated: a trainer job (any TP x PP x DP) and a job array of rollout.workers rollout
  workers, started together; they meet in the run directory (published weights, trajectory
  shards; see rlef_hpc.rollout.shards), so either side can be requeued on its own.
An evaluation job (unless slurm.eval_after=false) runs the evaluation protocol on the run's
checkpoints: after training (afterok), or, in the disaggregated layout with run.eval_every,
alongside it, evaluating each due checkpoint as it is saved, until the trainer's job ends.
Job ids are kept in RUN_DIR/slurm/jobs.json for `status` (the jobs, the learning curve, the
best checkpoint) and `cancel`; logs in RUN_DIR/slurm/.

Before anything is submitted: the config is validated, the memory plan must fit
(tools/plan.py), the run directory's parent must exist, and Slurm must answer.

--dry-run needs no Slurm (a laptop, a login node): it prints the memory plan and the sbatch script
of every job the layout submits (--job JOB: that script alone, to pipe into `sbatch
--test-only`), warns about paths it cannot find, and says what it did not check.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

from rlef_hpc.config import ConfigError, load, to_dict
from rlef_hpc.launch.config import JobConfig
from rlef_hpc.launch.slurm import SLURM_COMMANDS, SlurmUnavailable, job_states, require_slurm
from rlef_hpc.rollout.config import RolloutConfig

JOBS_FILE = "jobs.json"


class SubmitError(Exception):
    pass


def _with_run_dir(cfg: JobConfig, run_dir: Path) -> JobConfig:
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))


def preflight(cfg: JobConfig) -> list[str]:
    """Everything that can be checked before a job waits in a queue for hours. Raises on the
    layout (memory plan); returns the problems of paths, which only a real submission refuses
    (a dry run may be prepared away from the cluster's filesystem)."""
    from rlef_hpc.launch.plan import plan

    if cfg.slurm.gpus_per_node:
        report = plan(cfg)
        if not report.fits:
            raise SubmitError(report.refusal())
    problems = []
    run_dir = Path(cfg.run.dir)
    if not run_dir.parent.is_dir():
        problems.append(
            f"run.dir={run_dir}: its parent directory {run_dir.parent} does not exist (create "
            "it on a filesystem that every node of the job sees)"
        )
    if cfg.model.init == "hf" and not Path(cfg.model.hf_dir or "").is_dir():
        problems.append(f"model.hf_dir={cfg.model.hf_dir}: no such directory")
    for key in ("train_path", "valid_path", "test_path"):
        path = getattr(cfg.data, key)
        if cfg.data.source == "codecontests" and path and not Path(path).exists():
            problems.append(f"data.{key}={path}: no such file or directory")
    for path in cfg.eval.transfer:
        if not Path(path).is_file():
            problems.append(f"eval.transfer: {path}: no such file")
    return problems


@functools.cache
def _script_writer() -> type:
    """submitit's SlurmExecutor that only writes scripts: its constructor refuses to run where
    `srun` is not on PATH, which a dry run (on a laptop, a login node) must not need."""
    import submitit

    class ScriptWriter(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2  # "available": nothing it does here runs srun or sbatch

        def _submit_command(self, command: str) -> Any:
            raise SubmitError("a dry run submits nothing")

    return ScriptWriter


def _submitter(
    cfg: JobConfig,
    name: str,
    nodes: int,
    tasks: int,
    gpus: int,
    mem_gb: int,
    dry_run: bool = False,
) -> Any:
    """submitit's SlurmExecutor for one job, called a submitter here: "executor" in this
    project is the sandbox's test executor. `mem_gb`: per node. `dry_run`: one that writes
    scripts only, and needs no Slurm."""
    import submitit

    s = cfg.slurm
    cls = _script_writer() if dry_run else submitit.SlurmExecutor
    try:
        submitter = cls(folder=Path(cfg.run.dir) / "slurm" / "%j", max_num_timeout=s.max_requeues)
    except RuntimeError as e:  # no srun: require_slurm() says so first, this is a backstop
        raise SlurmUnavailable(str(e)) from None
    extra: dict[str, Any] = {"requeue": True}
    if s.account:
        extra["account"] = s.account
    if s.qos:
        extra["qos"] = s.qos
    params: dict[str, Any] = dict(
        job_name=f"rlef-{name}",
        nodes=nodes,
        ntasks_per_node=tasks,
        cpus_per_task=s.cpus_per_task,
        mem=f"{mem_gb}GB",
        time=s.time_minutes,
        signal_delay_s=s.signal_seconds,
        additional_parameters=extra,
    )
    if gpus:
        params["gpus_per_node"] = gpus
    # The job inherits the submitting shell's environment (sbatch's --export=ALL). A
    # rendezvous address set there describes that machine, not the job's first node, and a
    # port free there may be taken here by then (srun itself listens on ephemeral ports): the
    # job derives its own (rlef_hpc.dist_env.torch_env_from_slurm).
    params["setup"] = ["unset MASTER_ADDR MASTER_PORT"]
    if s.partition:
        params["partition"] = s.partition
    submitter.update_parameters(**params)
    return submitter


def submitters(cfg: JobConfig, dry_run: bool = False) -> dict[str, Any]:
    """The submitter of each job the layout needs: train, rollout (an array), eval."""
    s, r, p = cfg.slurm, cfg.rollout, cfg.parallel
    tasks = s.gpus_per_node or p.world_size // s.nodes
    job = functools.partial(_submitter, cfg, dry_run=dry_run)
    out = {"train": job("train", s.nodes, tasks, s.gpus_per_node, s.mem_gb)}
    if r.layout == "colocated" and p.tensor > 1:
        # Each engine's episodes run in the sandbox on its group's first rank: over the
        # node's CPUs, not the rank's share (slurm/lib.sh rlef_colocated does the same).
        out["train"].update_parameters(srun_args=["--cpu-bind=none"])
    rollout_gpus = r.tensor_parallel if s.gpus_per_node else 0
    # slurm.mem_gb is a whole node's: a one-task job on part of a node asks its share (its
    # GPUs' share, or one trainer task's on CPU clusters), else one worker takes the node.
    share = rollout_gpus / s.gpus_per_node if s.gpus_per_node else 1 / tasks
    one_task_gb = max(1, int(s.mem_gb * share))
    if r.layout == "disaggregated":
        out["rollout"] = job("rollout", 1, 1, rollout_gpus, one_task_gb)
    if s.eval_after:
        out["eval"] = job("eval", 1, 1, rollout_gpus, one_task_gb)
    return out


def sbatch_scripts(cfg: JobConfig) -> dict[str, str]:
    """The sbatch script submitit would submit for each job of the run (--dry-run); needs no
    Slurm."""
    scripts = {}
    for job, submitter in submitters(cfg, dry_run=True).items():
        if job == "rollout":
            submitter.parameters["map_count"] = cfg.rollout.workers
        if job == "eval" and not follows_training(cfg):
            submitter.update_parameters(dependency="afterok:TRAIN_JOB_ID")
        command = submitter._submitit_command_str
        scripts[job] = submitter._make_submission_file_text(command, "dry-run")
    return scripts


def follows_training(cfg: JobConfig) -> bool:
    """Whether the evaluation job runs alongside the trainer, evaluating checkpoints as they
    come (the disaggregated layout with run.eval_every: the trainer has no engine to evaluate
    with), rather than after it (afterok)."""
    return cfg.rollout.layout == "disaggregated" and cfg.run.eval_every > 0


def sbatch_script(cfg: JobConfig, job: str = "train") -> str:
    """The sbatch script submitit would submit for `job` (--dry-run --job JOB)."""
    scripts = sbatch_scripts(cfg)
    if job not in scripts:
        raise SubmitError(f"--job {job}: this config submits only {', '.join(scripts)}")
    return scripts[job]


_JOB_TITLES = {
    "train": "trainer",
    "rollout": "rollout workers (a job array, one task each)",
    "eval": "evaluation (after the trainer: afterok)",
    "eval-follow": "evaluation (alongside the trainer, following its checkpoints)",
}


def not_checked() -> str:
    """The one line a dry run ends with: what only Slurm itself can tell."""
    missing = [cmd for cmd in SLURM_COMMANDS if shutil.which(cmd) is None]
    why = f"no Slurm here: no {', '.join(missing)} on PATH" if missing else "nothing was submitted"
    return (
        "not checked: sbatch --test-only, whether Slurm accepts these jobs (partition, account, "
        f"QOS, node and GPU counts; {why})"
    )


def dry_run(cfg: JobConfig) -> str:
    """What --dry-run prints: the memory plan, every job's sbatch script, what was not checked."""
    from rlef_hpc.launch.plan import plan

    if cfg.slurm.gpus_per_node:
        memory = plan(cfg).table()
    else:
        memory = "none: a CPU-only job (slurm.gpus_per_node=0)"
    parts = [f"# ==== memory plan (tools/plan.py)\n{memory}"]
    scripts = sbatch_scripts(cfg)
    for job, script in scripts.items():
        title = _JOB_TITLES["eval-follow" if job == "eval" and follows_training(cfg) else job]
        parts.append(f"# ==== {job}: {title}: sbatch script\n{script.rstrip()}")
    if "rollout" not in scripts:
        parts.append(
            "# ==== rollout: none (colocated: each tensor-parallel group of trainer ranks has "
            "its own engine)"
        )
    return "\n\n".join([*parts, not_checked()])


def submit(cfg: JobConfig) -> dict[str, Any]:
    """Submits the run's jobs; returns (and records) their ids."""
    from rlef_hpc.launch.jobs import EvalJob, RolloutJob, TrainJob

    config = to_dict(cfg)
    by_job = submitters(cfg)
    jobs: dict[str, Any] = {"submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}
    train = by_job["train"].submit(TrainJob(config))
    jobs["train"] = train.job_id
    if "rollout" in by_job:
        workers = by_job["rollout"].submit_array(
            [RolloutJob(config, w) for w in range(cfg.rollout.workers)]
        )
        jobs["rollout"] = [w.job_id for w in workers]
    if "eval" in by_job:
        if follows_training(cfg):  # alongside: it stops waiting when the trainer's job ends
            job = EvalJob(config, follow=True, trainer_job=train.job_id)
        else:
            by_job["eval"].update_parameters(dependency=f"afterok:{train.job_id}")
            job = EvalJob(config)
        jobs["eval"] = by_job["eval"].submit(job).job_id
    record(Path(cfg.run.dir), jobs)
    return jobs


def record(run_dir: Path, jobs: dict[str, Any]) -> None:
    """Appends a submission to RUN_DIR/slurm/jobs.json (a resubmission keeps the history)."""
    path = run_dir / "slurm" / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps([*history, jobs], indent=2) + "\n")


def recorded(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "slurm" / JOBS_FILE
    if not run_dir.is_dir():
        raise SubmitError(f"{run_dir}: no such run directory")
    if not path.exists():
        raise SubmitError(f"{run_dir}: no jobs were submitted for this run (no slurm/{JOBS_FILE})")
    return json.loads(path.read_text())


def _ids(jobs: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for role in ("train", "rollout", "eval"):
        value = jobs.get(role)
        for job in value if isinstance(value, list) else [value] if value else []:
            out.append((role, str(job)))
    return out


def status(run_dir: Path) -> str:
    """The run's jobs and their states, its newest checkpoint and iteration, its shards, the
    learning curve so far and the best checkpoint on valid."""
    from rlef_hpc.checkpoint import training
    from rlef_hpc.eval.results import read_best, read_results
    from rlef_hpc.eval.tables import curve_table, summary
    from rlef_hpc.rollout.shards import ShardStore

    jobs = [j for submission in recorded(run_dir) for j in _ids(submission)]
    lines = ["| job | id | state |", "|---|---|---|"]
    try:
        require_slurm()
        states = job_states([j for _, j in jobs])
    except SlurmUnavailable as e:
        states, lines = {}, [f"job states unknown: {e}", *lines]
    lines += [f"| {role} | {job} | {states.get(job, '?')} |" for role, job in jobs]
    lines += training.status_lines(run_dir)
    store = ShardStore(run_dir)
    if store.root.exists():
        counts = store.audit()
        lines.append("trajectory shards: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    records = read_results(run_dir)
    if records:
        chosen = read_best(run_dir)
        select = chosen.metric if chosen else "1@3"
        lines += ["", curve_table(records, select), summary(records, select)]
        if (run_dir / "best" / "selected.json").exists():
            lines.append(f"exported: {run_dir / 'best'}")
    else:
        lines.append("evaluations: none yet")
    return "\n".join(lines)


def cancel(run_dir: Path, timeout_s: float = 120.0) -> list[str]:
    """scancel every job of the run, then waits until Slurm has none of them left."""
    jobs = [j for submission in recorded(run_dir) for _, j in _ids(submission)]
    require_slurm()  # after the run's records: a wrong RUN_DIR is the likelier mistake
    subprocess.run(["scancel", *jobs], check=False, capture_output=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        proc = subprocess.run(
            ["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)], capture_output=True, text=True
        )
        if not proc.stdout.strip():
            return jobs
        time.sleep(0.5)
    raise SubmitError(f"jobs still in the queue {timeout_s:.0f} s after scancel: {proc.stdout}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/submit.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="YAML config (configs/*.yaml), or status / cancel")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    layouts = typing.get_args(typing.get_type_hints(RolloutConfig)["layout"])
    p.add_argument("--layout", choices=layouts, help="rollout.layout")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the memory plan and every job's sbatch script; submit nothing, need no Slurm",
    )
    p.add_argument(
        "--job",
        choices=("train", "rollout", "eval"),
        help="with --dry-run: print only this job's sbatch script",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_intermixed_args(argv)  # options before, between or after the overrides
    try:
        if args.config in ("status", "cancel"):
            if len(args.overrides) != 1:
                raise SubmitError(f"usage: tools/submit.py {args.config} RUN_DIR")
            run_dir = Path(args.overrides[0]).resolve()
            if args.config == "status":
                print(status(run_dir))
            else:
                print("cancelled: " + " ".join(cancel(run_dir)))
            return 0
        overrides = list(args.overrides)
        if args.layout:
            overrides.append(f"rollout.layout={args.layout}")
        cfg = load(JobConfig, args.config, overrides)
        cfg = _with_run_dir(cfg, Path(cfg.run.dir).resolve())
        problems = preflight(cfg)
        if args.dry_run:
            for problem in problems:
                print(f"submit: warning: {problem}", file=sys.stderr)
            if args.job:  # the script alone on stdout, ready for `sbatch --test-only`
                print(sbatch_script(cfg, args.job))
                print(not_checked(), file=sys.stderr)
            else:
                print(dry_run(cfg))
            return 0
        if args.job:
            raise SubmitError("--job is for --dry-run: a submission submits every job")
        if problems:
            raise SubmitError("; ".join(problems))
        require_slurm()
        jobs = submit(cfg)
    except (ConfigError, ValueError, SubmitError, SlurmUnavailable, OSError) as e:
        p.exit(2, f"submit: error: {e}\n")
    print(json.dumps(jobs))
    print(f"status: python tools/submit.py status {cfg.run.dir}")
    return 0
