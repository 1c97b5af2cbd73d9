"""SLURM launch: the sbatch templates parse (and lint), array task i runs sweep line i, the
submitit launcher configs produce a valid sbatch script, and a real two-job multirun goes
through submitit's local executor."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import SMALL_RUN

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch")) + sorted((REPO / "slurm").glob("*.sh"))


def test_templates_exist_and_parse():
    names = {p.name for p in SCRIPTS}
    assert {"single_node.sbatch", "multi_node.sbatch", "array.sbatch", "common.sh", "site.example.sh"} <= names
    for script in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert r.returncode == 0, f"{script.name}: {r.stderr}"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_templates_pass_shellcheck():
    r = subprocess.run(["shellcheck", "-x", "-s", "bash", *[str(p.relative_to(REPO)) for p in SCRIPTS]],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_templates_ask_for_the_pre_timeout_signal_and_resume():
    for name in ("single_node.sbatch", "multi_node.sbatch", "array.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        directives = [line for line in text.splitlines() if line.startswith("#SBATCH")]
        assert "#SBATCH --signal=B:USR1@120" in directives and "#SBATCH --requeue" in directives, name
        assert "resume=auto" in text and "sa_run " in text, name
        # the exact submit command is documented at the top
        header = text.split("#SBATCH")[0]
        assert "sbatch " in header and f"slurm/{name}" in header, name


def test_torchrun_templates_fix_a_run_dir_a_requeued_job_finds_again():
    """single_node/multi_node: the default run dir holds the start time (so a requeued job, or a
    rank on another node, would get another one); the templates name it after the job id."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(STEPAGENT_ROOT=str(REPO), STEPAGENT_SITE=os.devnull, SLURM_JOB_ID="4242")

    def run_dir_args(*args):
        script = f'source "{REPO}/slurm/common.sh"; sa_stable_run_dir "$@"; printf "%s\\n" "${{SA_RUN_DIR[@]}}"'
        r = subprocess.run(["bash", "-c", script, "bash", *args], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        return [x for x in r.stdout.splitlines() if x]

    (override,) = run_dir_args("reward=implicit", "seed=4")
    cfg = _compose([override, "reward=implicit", "seed=4"])
    assert str(cfg.hydra.run.dir) == "outputs/slurm/4242_scienceworld_implicit_s4"
    # a run dir or an experiment (whose config sets one) given by the user is kept
    assert run_dir_args("hydra.run.dir=/x", "seed=1") == [] and run_dir_args("experiment=ablation_mini") == []
    for name in ("single_node.sbatch", "multi_node.sbatch"):
        text = (REPO / "slurm" / name).read_text()
        assert 'sa_stable_run_dir "$@"' in text and 'resume=auto "${SA_RUN_DIR[@]}" "$@"' in text, name


def _array_task(index, sweep, *args, **env):
    """``bash slurm/array.sbatch SWEEP ARGS`` as array task ``index``, printing instead of running."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    clean.update(SLURM_ARRAY_TASK_ID=str(index), STEPAGENT_DRY_RUN="1", PYTHON=sys.executable,
                 STEPAGENT_SITE=os.devnull, **env)
    return subprocess.run(["bash", str(REPO / "slurm" / "array.sbatch"), str(sweep), *args],
                          capture_output=True, text=True, cwd=REPO, env=clean, timeout=120)


def _printed_command(stdout, index):
    """The command sweep.py printed for line ``index`` (``[i] cmd...``)."""
    (line,) = [x for x in stdout.splitlines() if x.startswith(f"[{index}] ")]
    return shlex.split(line[len(f"[{index}] "):])


def test_array_index_runs_its_sweep_line(tmp_path):
    runs = tmp_path / "runs"
    lines = [
        f"seed=11 hydra.run.dir={runs}/a",
        f"reward=implicit seed=12 'sft.lr=0.002' hydra.run.dir={runs}/b  # a trailing comment",
        f"seed=13 cycles=1 hydra.run.dir={runs}/c",
    ]
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# header comment\n\n" + lines[0] + "\n   \n# between\n" + lines[1] + "\n" + lines[2] + "\n")
    count = subprocess.run([sys.executable, "experiments/sweep.py", str(sweep), "--count"],
                           capture_output=True, text=True, cwd=REPO)
    assert count.returncode == 0 and count.stdout.strip() == "3"

    for i, line in enumerate(lines):
        r = _array_task(i, sweep, "eval.max_episodes=1")
        assert r.returncode == 0, r.stdout + r.stderr
        cmd = _printed_command(r.stdout, i)
        expected = shlex.split(line.split("#")[0]) + ["resume=auto", "eval.max_episodes=1"]
        assert cmd[:2] == [sys.executable, str(REPO / "run.py")] and cmd[2:] == expected, cmd
        assert not (runs / "abc"[i]).exists()  # printed, not run

    # with 2 processes per node (--gpus-per-node=2 sets SLURM_GPUS_ON_NODE) the run goes under torchrun
    r = _array_task(1, sweep, SLURM_GPUS_ON_NODE="2")
    assert r.returncode == 0, r.stdout + r.stderr
    cmd = _printed_command(r.stdout, 1)
    assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(REPO / "run.py")]
    assert cmd[7:] == shlex.split(lines[1].split("#")[0]) + ["resume=auto"]

    # a finished run (results.json) is skipped; an index past the end fails
    (runs / "c").mkdir(parents=True)
    (runs / "c" / "results.json").write_text("{}")
    r = _array_task(2, sweep)
    assert r.returncode == 0 and f"[2] done already: {runs / 'c'}" in r.stdout
    r = _array_task(3, sweep)
    assert r.returncode != 0 and "has 3 run lines" in r.stderr
    # outside an array job the template refuses to guess an index
    r = _array_task("", sweep)
    assert r.returncode == 2 and "usage" in r.stderr


# A stand-in for a run: notes its start, waits for SIGUSR1 (up to argv[2] s), "checkpoints"
# for a moment and exits 143 like run.py after a preemption signal (0 without one).
CHILD = """
import signal, sys, time
log, wait = sys.argv[1], float(sys.argv[2])
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
with open(log, "a") as f:
    f.write("start " + " ".join(sys.argv[3:]) + "\\n")
deadline = time.time() + wait
while not got and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.3 if got else 0)
with open(log, "a") as f:
    f.write(f"signals {got}\\n")
sys.exit(143 if got else 0)
"""


def _wait_for(path, text, timeout=60):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.fixture
def fake_scontrol(tmp_path):
    """``scontrol`` that only records its arguments (there is no SLURM here)."""
    bin_dir = tmp_path / "scontrol-bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    return bin_dir, log


@pytest.mark.parametrize("signalled", [True, False])
def test_sa_run_passes_usr1_on_and_requeues(signalled, tmp_path, fake_scontrol):
    """The templates' sa_run: SIGUSR1 to the batch shell reaches the run, the shell waits for the
    run to finish its exit, returns its status and requeues the job (only after the signal)."""
    import signal as sig

    bin_dir, scontrol_log = fake_scontrol
    child, log = tmp_path / "child.py", tmp_path / "child.log"
    child.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(STEPAGENT_ROOT=str(REPO), STEPAGENT_SITE=os.devnull, SLURM_JOB_ID="4242",
               PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    script = f'source "{REPO}/slurm/common.sh"; sa_run "{sys.executable}" {child} {log} {30 if signalled else 0} x=1; echo "rc=$?"'
    p = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if signalled:
        _wait_for(log, "start x=1")
        p.send_signal(sig.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert f"rc={143 if signalled else 0}" in out, out + err
    assert log.read_text().splitlines() == ["start x=1", f"signals {[10] if signalled else []}"]
    if signalled:
        assert scontrol_log.read_text().split() == ["requeue", "4242"]
    else:
        assert not scontrol_log.exists()


def test_sweep_passes_usr1_on_and_stops(tmp_path):
    """sweep.py (what array.sbatch runs) passes SIGUSR1 on to the running line and starts no other."""
    import signal as sig

    child, log = tmp_path / "child.py", tmp_path / "child.log"
    child.write_text(CHILD)
    fake_python = tmp_path / "python"  # sweep.py --python: the child in place of `python run.py`
    fake_python.write_text(f'#!/bin/sh\nexec "{sys.executable}" {child} {log} 30 "$@"\n')
    fake_python.chmod(0o755)
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(f"seed=1 hydra.run.dir={tmp_path}/a\nseed=2 hydra.run.dir={tmp_path}/b\n")
    p = subprocess.Popen([sys.executable, "experiments/sweep.py", str(sweep), "--python", str(fake_python)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    _wait_for(log, "start")
    p.send_signal(sig.SIGUSR1)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig.SIGUSR1, out + err
    lines = log.read_text().splitlines()
    assert lines == [f"start {REPO / 'run.py'} seed=1 hydra.run.dir={tmp_path}/a", "signals [10]"]
    assert "[0] exit 143" in out and "stopped by SIGUSR1 after line 0" in err


def _compose(overrides, config_dir=REPO / "conf", hydra=True):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


def _sbatch_text(cfg, tmp_path, monkeypatch):
    """The sbatch script submitit would submit for this launcher config (as the plugin builds it)."""
    import submitit
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    # submitit only checks that an srun exists; nothing is submitted
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    launcher = instantiate(cfg.hydra.launcher)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -u -m submitit.core._submit DIR", "uid")


def test_slurm_launcher_config_makes_a_valid_sbatch_script(tmp_path, monkeypatch):
    from stepagent.config import validate_config

    monkeypatch.setenv("SBATCH_PARTITION", "gpu-test")
    monkeypatch.delenv("SBATCH_ACCOUNT", raising=False)
    cfg = _compose(["hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}/sweep", "seed=3",
                    "hydra.launcher.timeout_min=90", f"run_dir={tmp_path}/run"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    text = _sbatch_text(cfg, tmp_path, monkeypatch)
    lines = text.splitlines()
    for flag in ("--partition=gpu-test", "--signal=USR2@120", "--time=90", "--gpus-per-node=1",
                 "--ntasks-per-node=1", "--cpus-per-task=8", "--mem=64GB"):
        assert f"#SBATCH {flag}" in lines, (flag, text)
    assert not any(x.startswith("#SBATCH --account") for x in lines)  # unset: the cluster's default
    assert f'source "{REPO}/slurm/site.sh"' in text
    # the launcher lives in the hydra node, which is not part of the job config: it validates
    HydraConfig.instance().set_config(cfg)
    job = validate_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert job.seed == 3


def test_local_config_can_pick_the_slurm_launcher(tmp_path, monkeypatch):
    """conf/local/README.md's example: a per-cluster file selects and sets the launcher."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    readme = (REPO / "conf" / "local" / "README.md").read_text()
    example = readme.split("```yaml")[2].split("```")[0]  # the second example: the launcher
    (conf / "local" / "mycluster.yaml").write_text(example)
    cfg = _compose(["local=mycluster", f"hydra.sweep.dir={tmp_path}/sweep"], config_dir=conf)
    launcher = yaml.safe_load(example)["hydra"]["launcher"]
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    composed = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    for key, value in launcher.items():
        if isinstance(value, dict):  # merged into slurm.yaml's dict
            assert value.items() <= composed[key].items(), key
        else:
            assert composed[key] == value, key
    text = _sbatch_text(cfg, tmp_path, monkeypatch)
    assert f"#SBATCH --partition={launcher['partition']}" in text.splitlines()
    assert "#SBATCH --constraint=a100" in text.splitlines()


def test_local_submitit_multirun(tmp_path):
    """``python run.py -m hydra/launcher=local seed=0,1``: two real runs through submitit's local executor."""
    from stepagent.config import validate_config
    from stepagent.data.experts import load_or_build_experts
    from stepagent.envs import make_task

    tiny = [*SMALL_RUN, "sft.epochs=1", "eval.before_sft=false", "cycles=0", "task.num_workers=1",
            "inspection.heldout_trajectories=0"]
    # the expert trajectories, built once here; each job gets its own cache (cache_s${seed}):
    # the two jobs run at once and would both write the same tokenizer into a shared one
    cfg = validate_config(_compose([*tiny, f"run_dir={tmp_path}", f"cache_dir={tmp_path}"], hydra=False))
    load_or_build_experts(make_task(cfg.task), "train", tmp_path / "cache_s0", 1, progress=False)
    shutil.copytree(tmp_path / "cache_s0", tmp_path / "cache_s1")

    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "run.py", "-m", "hydra/launcher=local", "seed=0,1", *tiny,
           f"cache_dir={tmp_path}/cache_s${{seed}}", f"hydra.sweep.dir={sweep_dir}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "Submitit 'local' sweep output dir" in r.stdout + r.stderr
    for seed in (0, 1):
        (run_dir,) = sweep_dir.glob(f"{seed}_scienceworld_none_s{seed}")
        results = json.loads((run_dir / "results.json").read_text())
        assert results["summaries"]["sft"]["overall"]["episodes"] == 2
        resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        assert resolved["seed"] == seed and resolved["cache_dir"] == f"{tmp_path}/cache_s{seed}"
        assert resolved["run_dir"] == str(run_dir)
    # each job ran in its own submitit process, with its own job folder and log
    logs = sorted(sweep_dir.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2, logs
    assert all("Job completed successfully" in p.read_text() for p in logs)


@pytest.mark.slow
def test_array_task_preempted_requeued_and_resumed(tmp_path, fake_scontrol):
    """The whole path on real ScienceWorld: array task 0 runs; SIGUSR1 (SLURM's pre-time-out
    signal) to the batch shell goes through sweep.py to run.py, which stops and exits 143; the
    job is requeued; the requeued task (the same command) resumes with resume=auto and finishes."""
    import signal as sig

    bin_dir, scontrol_log = fake_scontrol
    run_dir = tmp_path / "run"
    line = [*SMALL_RUN, "sft.epochs=1", "eval.before_sft=false", "task.num_workers=1", "reward=implicit",
            "cycles=1", "inspection.trajectories=3", "inspection.heldout_trajectories=1",
            f"cache_dir={tmp_path}/cache", f"hydra.run.dir={run_dir}"]
    sweep = tmp_path / "sweep.txt"
    sweep.write_text(" ".join(shlex.quote(x) for x in line) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="77", PYTHON=sys.executable, STEPAGENT_SITE=os.devnull,
               PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
    cmd = ["bash", str(REPO / "slurm" / "array.sbatch"), str(sweep)]

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    _wait_for(run_dir / "checkpoints" / "sft" / "COMPLETE", "", timeout=300)  # SFT done, cycle 1 under way
    p.send_signal(sig.SIGUSR1)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 128 + sig.SIGUSR1, out[-5000:]
    assert "[0] exit 143" in out, out[-5000:]
    assert not (run_dir / "results.json").exists()
    assert scontrol_log.read_text().split() == ["requeue", "77"]

    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"},
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "restart 1" in r.stderr
    log_text = (run_dir / "run.log").read_text()
    assert "resuming from" in log_text and "after stage sft" in log_text
    results = json.loads((run_dir / "results.json").read_text())
    assert [c["cycle"] for c in results["cycles"]] == [1]
    assert scontrol_log.read_text().split() == ["requeue", "77"]  # no second requeue
