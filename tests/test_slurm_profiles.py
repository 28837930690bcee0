"""cluster/profiles/*.yaml load, validate and map onto submitit's SLURM parameters (no cluster needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import submitit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def profiles():
    spec = importlib.util.spec_from_file_location("cluster_profiles", REPO / "cluster" / "profiles.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loopback_profile(profiles):
    params = profiles.submitit_parameters(profiles.load_profile("loopback"))
    assert params == {"slurm_partition": "debug", "cpus_per_task": 1, "timeout_min": 60,
                      "slurm_signal_delay_s": 90}


@pytest.mark.parametrize("name", ["loopback", "example_gpu"])
def test_profiles_make_valid_sbatch_scripts(profiles, name, tmp_path):
    params = profiles.submitit_parameters(profiles.load_profile(name))
    ex = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    ex.update_parameters(**params)  # submitit validates by rendering the sbatch script
    script = ex._executor._make_submission_file_text("python -c pass", "%j")
    assert "#SBATCH --signal=USR2@90" in script
    if name == "example_gpu":
        for flag in ("--gpus-per-node=8", "--time=2880", "--partition=gpu", "--account=my-project",
                     "--qos=normal", "--constraint=h100"):
            assert f"#SBATCH {flag}" in script, (flag, script)


def test_bad_profiles_are_rejected(profiles, tmp_path):
    for text, msg in [("partitoin: x\n", "unknown key"), ("gpus_per_node: '8'\n", "must be int"),
                      ("signal: TERM@30\n", "USR2")]:
        p = tmp_path / "bad.yaml"
        p.write_text(text)
        with pytest.raises(ValueError, match=msg):
            profiles.load_profile(p)


def test_master_port_local_uses_the_submitters_free_port_slurm_stays_below_the_ephemeral_range(monkeypatch):
    from launcher.distributed import master_port

    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.setenv("MDIFF_MASTER_PORT", "45678")
    assert master_port() == 45678
    monkeypatch.delenv("MDIFF_MASTER_PORT")
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    ports = set()
    for job in ("17", "18", "123456", "123456_7"):
        monkeypatch.setenv("SLURM_JOB_ID", job.split("_")[0])
        if "_" in job:
            monkeypatch.setenv("SLURM_ARRAY_JOB_ID", job.split("_")[0])
            monkeypatch.setenv("SLURM_ARRAY_TASK_ID", job.split("_")[1])
        port = master_port()
        assert 15000 <= port < 30000 and port == master_port()     # the same on every task and requeue
        ports.add(port)
    assert len(ports) == 4
