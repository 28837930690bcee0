"""Session-scoped pytest fixture `slurm_cluster`: the loopback SLURM cluster from cluster/slurm_loopback.sh.

Use it from a test module with

    from slurm_fixture import slurm_cluster  # noqa: F401  (pytest finds the fixture by name)

The first test that asks for it starts the cluster (once per session; packages are installed if
missing, so it needs root) and the session stops it at the end -- but only if this session started
it: a cluster that was already up is left running. Several pytest sessions may share one cluster:
each registers itself under STATE_DIR/fixture-users/ and the last one out stops a cluster that a
fixture started. If the cluster cannot be started the test FAILS with the script's output (no skip);
deselect with `-m "not slurm"` on machines that cannot run it.

Environment: MDIFF_SLURM_STATE_DIR (default /tmp/mdiff-slurm), MDIFF_SLURM_PARTITION (default debug).
While the fixture is active, os.environ carries SLURM_CONF and /usr/sbin on PATH (restored at the end),
so submitit/sbatch/sacct called from tests talk to this cluster.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "slurm_loopback.sh"
START_TIMEOUT_S = 900  # includes apt-get install on a fresh machine


@dataclass
class SlurmCluster:
    state_dir: Path
    partition: str
    script: Path
    started_here: bool
    env: dict[str, str] = field(default_factory=dict)  # what was added to os.environ

    @property
    def slurm_conf(self) -> Path:
        return self.state_dir / "etc" / "slurm.conf"

    def logs(self, lines: int = 60) -> str:
        """Tails of the daemon logs, for failure messages."""
        out = []
        for p in sorted((self.state_dir / "log").glob("*.log")):
            try:
                tail = p.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"----- {p} -----\n" + "\n".join(tail))
        return "\n".join(out)


def _run(cmd: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), cmd, str(state_dir)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _locked(state_dir: Path) -> FileLock:
    state_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(state_dir / ".fixture.lock")


def _live_users(users: Path) -> list[Path]:
    live = []
    for p in users.glob("*"):
        try:
            os.kill(int(p.name), 0)
            live.append(p)
        except (ValueError, ProcessLookupError):
            p.unlink(missing_ok=True)  # a session that died without cleaning up
        except PermissionError:
            live.append(p)
    return live


@pytest.fixture(scope="session")
def slurm_cluster():
    state_dir = Path(os.environ.get("MDIFF_SLURM_STATE_DIR", "/tmp/mdiff-slurm")).resolve()
    partition = os.environ.get("MDIFF_SLURM_PARTITION", "debug")
    users = state_dir / "fixture-users"
    marker = state_dir / "fixture-started"
    me = users / str(os.getpid())

    with _locked(state_dir):
        status = _run("status", state_dir, timeout=60)
        started_here = False
        if status.returncode != 0:
            try:
                res = _run("start", state_dir, timeout=START_TIMEOUT_S)
            except subprocess.TimeoutExpired as e:
                pytest.fail(f"slurm_loopback.sh start timed out after {START_TIMEOUT_S}s:\n{e.output}", pytrace=False)
            if res.returncode != 0:
                pytest.fail(f"slurm_loopback.sh start {state_dir} failed (rc={res.returncode}):\n{res.stdout}",
                            pytrace=False)
            started_here = True
            marker.write_text(str(os.getpid()))
        users.mkdir(parents=True, exist_ok=True)
        me.write_text("")

    added = {"SLURM_CONF": str(state_dir / "etc" / "slurm.conf")}
    if "/usr/sbin" not in os.environ.get("PATH", "").split(":"):
        added["PATH"] = "/usr/sbin:" + os.environ.get("PATH", "")
    saved = {k: os.environ.get(k) for k in added}
    os.environ.update(added)
    cluster = SlurmCluster(state_dir=state_dir, partition=partition, script=SCRIPT,
                           started_here=started_here, env=added)
    try:
        yield cluster
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with _locked(state_dir):
            me.unlink(missing_ok=True)
            # Stop only a cluster some fixture started, and only when no other session still uses it.
            if marker.exists() and not _live_users(users):
                res = _run("stop", state_dir, timeout=180)
                marker.unlink(missing_ok=True)
                if res.returncode != 0:
                    print(f"slurm_loopback.sh stop failed (rc={res.returncode}):\n{res.stdout}")
