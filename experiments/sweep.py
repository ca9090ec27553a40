"""The sweep: every variant x seed trained under the same budget, resumable, then the report.

    python -m experiments.sweep                      # full: 3 main variants x 5 seeds + grid x 3 seeds
    python -m experiments.sweep --quick              # 3 main variants x 2 seeds, 20 steps (minutes)
    python -m experiments.sweep --task misleading    # the same comparison on the misleading task
    python -m experiments.sweep --jobs 2             # two runs at a time (each uses one thread)
    python -m experiments.sweep --dry-run            # print the plan and the commands only

Layout under `--root` (default `experiments/runs/<task>-<budget>`): `warm/seed<S>/` holds the
warm start of seed S (tiny model, data, supervised warm start; `experiments.warm_start`),
`<variant>/seed<S>/` one trainer run (`python -m train.run`, its log in `train.log`). Each
run directory starts with a copy of its seed's warm start, which the trainer reuses, so all
variants of a seed share the warm-started weights, data and tokenizer; with the same seed they
also see the same prompt order, masks and sampling seeds. A run is finished when the driver
has written its `experiment.json` (after a zero exit and an `eval_final.json`); finished runs
are skipped, an interrupted one resumes from its newest checkpoint when the sweep is run
again. At the end the report (`experiments.report`) is written to `--results`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from experiments.variants import BASE_CONFIG, BUDGETS, ROOT, TASKS, Variant, select
from experiments.warm_start import ASSETS

MARKER = "experiment.json"
WARM_MARKER = "WARM.json"


@dataclass
class Job:
    """One subprocess of the sweep: a warm start (variant None) or a training run."""

    seed: int
    out_dir: Path
    overrides: list[str]
    variant: Variant | None = None
    proc: subprocess.Popen | None = None
    started: float = 0.0
    log_file: object = None
    loadavg_start: tuple = ()
    cpu_s: float = 0.0
    needs: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.variant.name if self.variant else 'warm start'} seed {self.seed}"

    @property
    def marker(self) -> Path:
        return self.out_dir / (MARKER if self.variant else WARM_MARKER)

    def command(self) -> list[str]:
        module = "train.run" if self.variant else "experiments.warm_start"
        return [sys.executable, "-m", module, "--config", str(BASE_CONFIG), *self.overrides]


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def plan(args) -> tuple[list[Job], list[Job], dict]:
    """(warm-start jobs, run jobs, sweep identity) of the requested sweep, finished ones included."""
    variants = select(args.variants)
    common = [*TASKS[args.task], *BUDGETS[args.budget], *args.set]
    root = Path(args.root)
    identity = {"task": args.task, "budget": args.budget, "set": list(args.set),
                "base_config": str(BASE_CONFIG.relative_to(ROOT))}
    runs: list[Job] = []
    seeds_needed: set[int] = set()
    n_seeds = max(args.seeds, args.grid_seeds)
    for seed in range(1, n_seeds + 1):  # seed-major: a cut sweep leaves complete paired sets
        for v in variants:
            if seed > (args.seeds if v.group == "main" else args.grid_seeds):
                continue
            out = root / v.name / f"seed{seed}"
            runs.append(Job(seed, out, [f"out_dir={out}", f"seed={seed}", *common, *v.overrides], v,
                            needs=[root / "warm" / f"seed{seed}"]))
            seeds_needed.add(seed)
    warms = []
    for seed in sorted(seeds_needed):
        out = root / "warm" / f"seed{seed}"
        warms.append(Job(seed, out, [f"out_dir={out}", f"seed={seed}", *common]))
    return warms, runs, identity


def check_identity(root: Path, identity: dict) -> None:
    """A root holds one sweep: refuse to mix runs made with other tasks, budgets or overrides."""
    path = root / "sweep.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != identity:
            raise SystemExit(f"error: {root} holds a sweep made with {old}, not {identity}; "
                             "choose another --root (or delete that one)")
    else:
        root.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(identity, indent=2) + "\n")


def is_finished(job: Job) -> bool:
    """Finished with these overrides; a marker written with other overrides is an error."""
    if not job.marker.exists():
        return False
    done = json.loads(job.marker.read_text())
    if done.get("overrides") != job.overrides:
        raise SystemExit(f"error: {job.marker} was made with overrides {done.get('overrides')}, "
                         f"this sweep would use {job.overrides}; choose another --root")
    return True


def seed_run_dir(job: Job) -> None:
    """Copy the seed's warm start into a run directory that does not have it yet."""
    job.out_dir.mkdir(parents=True, exist_ok=True)
    for src_dir in job.needs:
        for name in ASSETS:
            src, dst = src_dir / name, job.out_dir / name
            if src.exists() and not dst.exists():
                tmp = job.out_dir / f".tmp-{name}"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                tmp.rename(dst)


def start(job: Job) -> None:
    if job.variant is None:
        # an unfinished warm start may have left a half-written sft_model: redo it whole
        shutil.rmtree(job.out_dir / "sft_model", ignore_errors=True)
    seed_run_dir(job)
    job.log_file = open(job.out_dir / "train.log", "a")
    job.log_file.write(f"\n===== {_now()} attempt: {' '.join(job.command())}\n")
    job.log_file.flush()
    env = dict(os.environ)
    inherited = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *inherited])
    job.started = time.time()
    job.loadavg_start = os.getloadavg()
    # own session: an interrupt stops the trainer and its grader workers together
    job.proc = subprocess.Popen(job.command(), cwd=ROOT, env=env, stdout=job.log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)


def reap(job: Job) -> int | None:
    """The exit code of a finished job (None while it runs); records its CPU seconds.

    `os.wait4` instead of `Popen.poll`: its resource usage covers the trainer and the grader
    workers it reaped, so the CPU time of a run is known even when the machine is shared and
    wall time overstates the cost.
    """
    pid, status, usage = os.wait4(job.proc.pid, os.WNOHANG)
    if pid == 0:
        return None
    job.proc.returncode = os.waitstatus_to_exitcode(status)
    job.cpu_s = usage.ru_utime + usage.ru_stime
    return job.proc.returncode


def _attempts(job: Job) -> list[dict]:
    path = job.out_dir / "attempts.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def record_attempt(job: Job, rc: int, *, interrupted: bool = False) -> None:
    """Append this attempt's exit code, wall and CPU time to the run's attempts.jsonl (an
    interrupted attempt counts too: a resumed run's cost is the sum of its attempts)."""
    if job.log_file is not None and not job.log_file.closed:
        job.log_file.close()
    with (job.out_dir / "attempts.jsonl").open("a") as f:
        f.write(json.dumps({"finished_at": _now(), "rc": rc, "interrupted": interrupted,
                            "wall_s": time.time() - job.started, "cpu_s": job.cpu_s,
                            "loadavg_start": job.loadavg_start, "loadavg_end": os.getloadavg()}) + "\n")


def finish(job: Job, rc: int) -> str | None:
    """Record the attempt; write the marker on success. Returns an error message or None."""
    record_attempt(job, rc)
    if rc != 0:
        return f"exit code {rc}"
    if job.variant is not None and not (job.out_dir / "eval_final.json").exists():
        return "the trainer exited without writing eval_final.json (is eval.every > 0?)"
    attempts = _attempts(job)
    record = {
        "variant": job.variant.name if job.variant else None,
        "seed": job.seed,
        "overrides": job.overrides,
        "wall_s": sum(a["wall_s"] for a in attempts),
        "cpu_s": sum(a.get("cpu_s", 0.0) for a in attempts),
        "attempts": len(attempts),
        "resumed": len(attempts) > 1,
        "finished_at": _now(),
        "git_commit": _git_commit(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    tmp = job.marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.rename(job.marker)
    return None


def last_step(job: Job) -> int:
    path = job.out_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        if '"reward/accuracy"' in line:
            step = max(step, json.loads(line)["step"])
    return step


def summary_line(job: Job) -> str:
    if job.variant is None:
        return ""
    r = json.loads((job.out_dir / "eval_final.json").read_text())
    k = next((key for key in r if key.startswith("eval/avg@")), None)
    parts = []
    if k is not None:
        parts.append(f"held-out {k[5:]} {100 * r[k]:.1f}%")
        if "initial" in r:
            parts.append(f"(step 0: {100 * r['initial'][k[5:]]:.1f}%)")
    if "black_images" in r and k is not None:
        parts.append(f"black images {100 * r['black_images'][k[5:]]:.1f}%")
    return ": " + " ".join(parts)


def stop_all(running: list[Job]) -> None:
    """Terminate the process groups this sweep started (trainer + its grader workers) and
    record their attempts."""
    for job in running:
        try:
            os.killpg(job.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 15
    for job in running:
        rc = reap(job)
        while rc is None and time.time() < deadline:
            time.sleep(0.2)
            rc = reap(job)
        if rc is None:
            try:
                os.killpg(job.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(job.proc.pid, 0)
            job.cpu_s = usage.ru_utime + usage.ru_stime
            rc = os.waitstatus_to_exitcode(status)
        record_attempt(job, rc, interrupted=True)


def execute(warms: list[Job], runs: list[Job], *, jobs: int, progress_every: float) -> list[str]:
    """Run the unfinished jobs, at most `jobs` at a time; returns the failures."""
    todo_warm = [j for j in warms if not is_finished(j)]
    todo_runs = [j for j in runs if not is_finished(j)]
    done_runs = len(runs) - len(todo_runs)
    _say(f"{len(runs)} runs planned, {done_runs} already finished, {len(todo_runs)} to do "
         f"(+{len(todo_warm)} warm starts); {jobs} at a time")
    pending = todo_warm + todo_runs
    total = len(pending)
    finished_warm = {j.out_dir for j in warms if j not in todo_warm}
    failed_warm: set[Path] = set()
    running: list[Job] = []
    failures: list[str] = []
    durations: list[float] = []
    n_done = 0
    last_progress = time.time()
    try:
        while pending or running:
            # start what is ready: warm starts first, runs once their seed's warm start is done
            for job in list(pending):
                if len(running) >= jobs:
                    break
                if any(d in failed_warm for d in job.needs):
                    pending.remove(job)
                    n_done += 1
                    failures.append(f"{job.label}: skipped, its warm start failed")
                    continue
                if all(d in finished_warm for d in job.needs):
                    pending.remove(job)
                    start(job)
                    running.append(job)
                    _say(f"[{n_done + len(running):3d}/{total}] start {job.label} "
                         f"(log {job.out_dir / 'train.log'})")
            time.sleep(0.5)
            for job in list(running):
                rc = reap(job)
                if rc is None:
                    continue
                running.remove(job)
                n_done += 1
                err = finish(job, rc)
                wall = time.time() - job.started
                if err is None:
                    if job.variant is None:
                        finished_warm.add(job.out_dir)
                    else:
                        durations.append(wall)
                    left = len(pending) + len(running)
                    eta = ""
                    if durations and left:
                        eta = f" | about {sum(durations) / len(durations) * left / jobs / 60:.0f} min left"
                    _say(f"[{n_done:3d}/{total}] done  {job.label} in {wall:.0f} s ({job.cpu_s:.0f} s CPU)"
                         f"{summary_line(job)}{eta}")
                else:
                    if job.variant is None:
                        failed_warm.add(job.out_dir)
                    failures.append(f"{job.label}: {err} (log {job.out_dir / 'train.log'})")
                    _say(f"[{n_done:3d}/{total}] FAILED {job.label}: {err}; see {job.out_dir / 'train.log'}")
            if running and time.time() - last_progress >= progress_every:
                last_progress = time.time()
                _say("running: " + ", ".join(
                    f"{j.label} " + (f"step {last_step(j)}" if j.variant else "(warm start)") +
                    f" ({time.time() - j.started:.0f} s)" for j in running))
    except KeyboardInterrupt:
        _say("interrupted: stopping the running jobs; run the same command again to resume "
             "(finished runs are skipped, unfinished ones resume from their newest checkpoint)")
        stop_all(running)
        raise
    return failures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the quick budget (20 PAPO steps), 2 seeds, main variants only (unless given)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                        help="training budget (default full)")
    parser.add_argument("--task", choices=sorted(TASKS), default="standard", help="synthetic task variant")
    parser.add_argument("--variants", default=None,
                        help="comma list of variants and groups (main, grid, all); default all (quick: main)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds 1..N of the main variants (default 5, quick 2)")
    parser.add_argument("--grid-seeds", type=int, default=None,
                        help="seeds 1..N of the grid (default 3, quick 2)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (each trainer uses one CPU thread)")
    parser.add_argument("--root", default=None,
                        help="run directories (default experiments/runs/<task>-<budget>)")
    parser.add_argument("--results", default=None,
                        help="report folder (default experiments/results/<task>-<budget>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra trainer override for every run and warm start (repeatable)")
    parser.add_argument("--progress-every", type=float, default=60.0, help="seconds between progress lines")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = parser.parse_args(argv)
    args.budget = args.budget or ("quick" if args.quick else "full")
    args.variants = args.variants or ("main" if args.quick else "all")
    args.seeds = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    args.grid_seeds = args.grid_seeds if args.grid_seeds is not None else (2 if args.quick else 3)
    for name in ("seeds", "grid_seeds", "jobs"):
        if getattr(args, name) < 1 and not (name == "grid_seeds" and getattr(args, name) == 0):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects KEY=VALUE, got {item!r}")
        if item.split("=", 1)[0].strip() in ("out_dir", "seed"):
            parser.error(f"--set {item!r}: out_dir and seed are chosen by the sweep")
    name = f"{args.task}-{args.budget}"
    args.root = args.root or str(ROOT / "experiments" / "runs" / name)
    args.results = args.results or str(ROOT / "experiments" / "results" / name)
    try:
        select(args.variants)
    except ValueError as e:
        parser.error(str(e))
    return args


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Plan, run what is unfinished, write the report; returns the exit code."""
    args = parse_args(argv)
    # `kill` (SIGTERM) stops the sweep like Ctrl-C: the running trainers are stopped with it;
    # Ctrl-C is also restored where a launcher left it ignored (background jobs)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    warms, runs, identity = plan(args)
    if args.dry_run:
        for job in warms + runs:
            state = "finished" if job.marker.exists() else "to do"
            print(f"{job.label:<22} {state:<9} {' '.join(job.command())}")
        return 0
    check_identity(Path(args.root), identity)
    try:
        failures = execute(warms, runs, jobs=args.jobs, progress_every=args.progress_every)
    except KeyboardInterrupt:
        return 130
    if not args.no_report:
        from experiments.report import write_report

        written = write_report(Path(args.root), Path(args.results))
        _say(f"report: {written['markdown']} ({len(written['files'])} files in {args.results})")
    for f in failures:
        _say(f"failed: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
