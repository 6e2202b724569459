"""Cluster runs on a real single-node SLURM: Debian's slurm-wlm with munge, `slurmctld` and `slurmd` started here as root
with a minimal slurm.conf (no cgroups), driven through submitit by `reproduce --executor slurm`. A sweep with
dependencies whose training is one job per width; a job killed by its time limit, requeued, finishing without redoing
finished steps, watched by a submitter that was itself killed and re-attached; a job that ends without a result is
reported failed with SLURM's state instead of awaited forever. Where SLURM cannot start, each test says why and runs the same scenario on submitit's local executor
(which simulates the time limit and the requeue)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reproduce import _entry, _project, _run, _writer, kernel_of_this_interpreter   # noqa: F401 (fixture)

SLURM_CONF = """ClusterName=ldmtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=5
InactiveLimit=0
NodeName={host} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _why_no_slurm() -> str | None:
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol") if not shutil.which(b)]
    if missing: return f"{', '.join(missing)} not installed (Debian: apt-get install slurm-wlm munge; `make test` does it as root)"
    if os.geteuid() != 0: return "not root: this test starts slurmctld, slurmd and munged itself"
    if not Path("/etc/munge/munge.key").exists(): return "no /etc/munge/munge.key"
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """'slurm' with a running single-node cluster (SLURM_CONF set), or 'local' and the reason SLURM could not start."""
    why = _why_no_slurm()
    if why is None:
        d = tmp_path_factory.mktemp("slurm")
        for sub in ("state", "spool"): (d / sub).mkdir()
        conf = d / "slurm.conf"
        conf.write_text(SLURM_CONF.format(host=socket.gethostname(), d=d, cpus=os.cpu_count()))
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
            Path("/run/munge").mkdir(parents=True, exist_ok=True); shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "munged"], check=False)
        old = os.environ.get("SLURM_CONF"); os.environ["SLURM_CONF"] = str(conf)
        subprocess.run(["slurmctld", "-f", str(conf)], check=False); subprocess.run(["slurmd", "-f", str(conf)], check=False)
        deadline = time.time() + 60
        while time.time() < deadline:
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed"): break
            time.sleep(1)
        else:
            why = "slurmctld/slurmd did not come up in 60 s: " + ((d / "slurmctld.log").read_text()[-500:] if (d / "slurmctld.log").exists() else "no log")
        if why is None:
            yield "slurm", None
        subprocess.run(["scancel", "--partition", "debug"], check=False, capture_output=True)   # no job outlives the cluster
        time.sleep(2)
        for pid in ("slurmd.pid", "slurmctld.pid"):
            if (d / pid).exists(): subprocess.run(["kill", (d / pid).read_text().strip()], check=False)
        subprocess.run(["pkill", "-f", "slurmstepd"], check=False)            # steps slurmd left behind
        if old is None: os.environ.pop("SLURM_CONF", None)
        else: os.environ["SLURM_CONF"] = old
        if why is None: return
    print(f"SLURM could not start ({why}): running the scenario on submitit's local executor")
    yield "local", why


def _slurm_logs(tmp_path) -> str:
    """What a failure needs to be read: the queue, drained nodes, the daemons' logs and every job's stderr."""
    out = []
    for cmd in (["squeue", "--states=all", "-o", "%i %j %T %r %M"], ["sinfo", "-R"]):
        r = subprocess.run(cmd, capture_output=True, text=True) if shutil.which(cmd[0]) else None
        if r: out.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    conf = os.environ.get("SLURM_CONF")
    logs = [Path(conf).parent / n for n in ("slurmctld.log", "slurmd.log")] if conf else []
    for f in [*logs, *sorted(tmp_path.glob("runs/*/submitit/*_log.err"))]:
        if f.exists(): out.append(f"--- {f.name} (tail)\n{f.read_text()[-1500:]}")
    return "\n" + "\n".join(out)


def test_a_sweep_with_dependencies_trains_one_job_per_width(cluster, tmp_path, monkeypatch):
    kind, why = cluster
    monkeypatch.setenv("LDM_PAPER_CACHE", str(tmp_path / "cache"))
    slurm = dict(timeout_min=10, cpus_per_task=1, mem_gb=1)
    train = ("from ldm_paper.experiment import train_family\n"
             "runs = train_family(preset, progress=False)   # finds both widths trained by their own jobs\n" + _writer("train"))
    path = _project(tmp_path, jobs=[_entry("train")], figures=[_entry("b", needs=["train"])], slurm=slurm,
                    notebooks={"train": [train], "b": ["text = open(f'figures/train_{preset}.txt').read()\n" + _writer("b")]})
    rc, log = _run("ci", manifest=path, executor="slurm", cluster=kind, poll_s=1)
    assert rc == 0, log + _slurm_logs(tmp_path)
    for w in ("train-c16", "train-c24", "train", "b"):
        assert f"{w}: submitted as {kind} job" in log, log
    assert log.index("train-c16: ok") < log.index("train: submitted") and log.index("train-c24: ok") < log.index("train: submitted")
    assert log.index("train: ok") < log.index("b: submitted")                    # b waited for the entry it needs
    done = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "train").glob("cpu-c*/done.json")]
    assert sorted(d["steps"] for d in done) == [30, 30]                             # each width trained once, by its job
    assert "to run: 0" in _run("ci", manifest=path, executor="slurm", cluster=kind)[1]


def test_a_job_past_its_time_limit_is_requeued_and_resumes(cluster, tmp_path):
    """A 2-minute job of 100 steps of 1 s: SLURM signals it 30 s before its limit (give or take the minute SLURM allows
    itself, so 30-90 s into the attempt, always before the steps are done), submitit checkpoints and requeues
    it, and the second attempt does only the steps the first did not finish (every step is logged once), at 0.05 s a step
    so that it finishes before its own signal (each requeue waits about 2 min in SLURM's queue). On SLURM the
    submitter is killed after submitting, and the next one re-attaches to the queued job instead of submitting another."""
    kind, why = cluster
    body = ("import time, os\nfrom pathlib import Path\n"
            "d = Path('steps'); d.mkdir(exist_ok=True)\n"
            "with open(d / 'attempts.log', 'a') as f: f.write(os.environ.get('SLURM_RESTART_COUNT', os.environ.get('SUBMITIT_LOCAL_JOB_ID', '-')) + '\\n')\n"
            "first = len((d / 'attempts.log').read_text().split()) == 1\n"
            "for k in range(100):\n"
            "    if (d / f'{k:03d}').exists(): continue\n"
            "    time.sleep(1 if first else 0.05); (d / f'{k:03d}').write_text('done')\n"
            "    with open(d / 'steps.log', 'a') as f: f.write(f'{k}\\n')\n" + _writer("long"))
    slurm = dict(timeout_min=2, cpus_per_task=1, mem_gb=1, slurm_signal_delay_s=30)
    path = _project(tmp_path, jobs=[_entry("long")], figures=[], notebooks={"long": [body]}, slurm=slurm)
    if kind == "slurm":       # the submitter is killed once its job is queued; the next one re-attaches to that job
        code = f"from ldm_paper.reproduce import reproduce; reproduce('ci', manifest={str(path)!r}, executor='slurm', cluster='slurm', poll_s=1)"
        first = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen = []
        for line in first.stdout:
            seen.append(line)
            if "long: submitted" in line: break
        first.kill(); first.wait()
        assert "long: submitted as slurm job" in "".join(seen), "".join(seen)
    rc, log = _run("ci", manifest=path, executor="slurm", cluster=kind, poll_s=2)
    assert rc == 0, log + _slurm_logs(tmp_path)
    if kind == "slurm":
        assert "long: re-attached to slurm job" in log and "long: submitted" not in log, log   # one job, never two
    steps = (tmp_path / "steps" / "steps.log").read_text().split()
    assert sorted(map(int, steps)) == list(range(100)) and len(steps) == len(set(steps)) == 100   # none redone
    attempts = (tmp_path / "steps" / "attempts.log").read_text().split()
    assert len(attempts) >= 2, attempts                                              # it was stopped and requeued
    assert (tmp_path / "runs" / "ci" / "long.done.json").exists()


def test_a_job_that_ends_without_a_result_is_reported_not_awaited(cluster, tmp_path):
    """SLURM keeps no accounting here (no slurmdbd), so `sacct` fails and submitit alone would wait forever for a job
    that ended without a result (killed by the OOM killer, say); the runner reads slurmctld's state and reports it failed."""
    kind, why = cluster
    if kind != "slurm": pytest.skip(f"needs SLURM itself ({why})")
    # the job's own process (the notebook's kernel's parent) is killed outright, as the kernel's OOM killer would
    body = "import os, signal, time\nos.kill(os.getppid(), signal.SIGKILL)\ntime.sleep(60)\n" + _writer("gone")
    path = _project(tmp_path, jobs=[_entry("gone")], figures=[], notebooks={"gone": [body]}, slurm=dict(timeout_min=5, cpus_per_task=1, mem_gb=1))
    t0 = time.time()
    rc, log = _run("ci", manifest=path, executor="slurm", cluster=kind, poll_s=1)
    assert rc == 1 and "SLURM FAILED" in log and "gone: FAILED" in log, log + _slurm_logs(tmp_path)
    assert time.time() - t0 < 150, log                 # seen ENDED_GRACE_S (20 s) after the job ended, not awaited forever
