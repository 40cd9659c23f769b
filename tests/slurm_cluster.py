"""A real one-node SLURM cluster for the tests: Debian's slurmctld, slurmd and munge.

Started as FIELD-NOTES ("SLURM") describes, with everything it writes under one temporary
folder: the munge key and socket, slurm.conf, the controller's state, slurmd's spool, the
daemons' logs and pid files. Clients find the cluster through ``SLURM_CONF`` (in
:attr:`SlurmCluster.env`), which sbatch passes on to the jobs; nothing in /etc is used or
changed, and the ports are free ones, so a site SLURM on the same machine is left alone.

The node is this machine (``hostname -s``, ``nproc`` CPUs) and declares two stand-in GPUs
(gres.conf names /dev/null and /dev/zero as their device files): sbatch then accepts
``--gpus-per-node`` up to 2, and a job that asks for GPUs reaches the launcher's own GPU check,
which must refuse it on a machine without NVIDIA GPUs.

    python tests/slurm_cluster.py up /tmp/slurm-dev     # start one by hand; prints SLURM_CONF
    python tests/slurm_cluster.py down /tmp/slurm-dev   # stop it (the daemons, by pid)

The tests use :func:`start_cluster` from a module-scoped fixture; it raises
:class:`SlurmUnavailable` with the reason when SLURM cannot be installed or started, and the
fixture turns that into a visible skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Debian package -> a program it installs.
PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "slurm-client": "sbatch", "munge": "munged"}
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
#: Seconds between SIGTERM and SIGKILL when a job ends (SLURM's default is 30).
KILL_WAIT_S = 5
#: Job credential lifetime; also how long a requeued job waits before it may start again
#: (SLURM's default is 120 s, too long for a test). A requeued job then starts at the next
#: pass of the scheduler, every `sched_interval` seconds (default 60; 1 here).
CRED_EXPIRE_S = 10
#: Device files standing in for the node's GPUs (nothing opens them).
FAKE_GPU_FILES = ("/dev/null", "/dev/zero")
GPUS = len(FAKE_GPU_FILES)


class SlurmUnavailable(RuntimeError):
    """SLURM cannot be installed or started on this machine; the message says why."""


def _path_env() -> dict[str, str]:
    path = os.environ.get("PATH", "")
    extra = [d for d in SBIN if d not in path.split(":")]
    return {**os.environ, "PATH": ":".join([path, *extra]).strip(":")}


def _which(program: str) -> str | None:
    return shutil.which(program, path=_path_env()["PATH"])


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_installed(timeout_s: float = 900) -> None:
    """Install the four Debian packages if any program is missing (`apt-get update` first)."""
    missing = [pkg for pkg, program in PACKAGES.items() if _which(program) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"{' '.join(missing)} not installed, and not root to apt-get install them")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable(f"{' '.join(missing)} not installed, and no apt-get on this machine")
    env = {**_path_env(), "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                                   f"{_tail(proc.stdout + proc.stderr)}")
    still = [pkg for pkg, program in PACKAGES.items() if _which(program) is None]
    if still:
        raise SlurmUnavailable(f"apt-get install ran but {' '.join(still)} still missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


class SlurmCluster:
    """One slurmctld, one slurmd and one munged, all state under :attr:`root`."""

    def __init__(self, root: Path | None = None) -> None:
        self._own_root = root is None
        if root is None:
            # Not under pytest's tmp folders: those are 0700 root, and munged runs as user munge
            # and refuses (or cannot reach) a key or socket behind them.
            root = Path(tempfile.mkdtemp(prefix="introvae-slurm-", dir="/tmp"))
        self.root = Path(root)
        self.node = socket.gethostname().split(".")[0]          # hostname -s
        self.cpus = len(os.sched_getaffinity(0))                 # nproc
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.log_dir = self.root / "log"
        self.env = {**_path_env(), "SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}
        self._procs: list[subprocess.Popen[bytes]] = []

    # -- start --------------------------------------------------------------------------------

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        try:
            self._write_files()
            self._start_munge(timeout_s)
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop(remove=self._own_root)  # a folder given by hand is kept, logs included
            raise
        return self

    def _write_files(self) -> None:
        import pwd

        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable("no user 'munge' (the munge package creates it)") from None
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(exist_ok=True)
        # munged checks its files like sshd does: owned by it, nothing writable by others.
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for path in (self.munge_dir, key):
            os.chown(path, munge_user.pw_uid, munge_user.pw_gid)
        self.conf.write_text(self.slurm_conf())
        # Stand-in GPUs: slurmd counts a GPU only by its device file, and any file will do.
        (self.root / "gres.conf").write_text(
            "".join(f"NodeName={self.node} Name=gpu File={dev}\n" for dev in FAKE_GPU_FILES))

    def slurm_conf(self) -> str:
        r = self.root
        return f"""\
# Written by tests/slurm_cluster.py: a one-node test cluster, everything under {r}
ClusterName=introvae-test
SlurmctldHost={self.node}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_dir / "munge.socket"},cred_expire={CRED_EXPIRE_S}
StateSaveLocation={r / "state"}
SlurmdSpoolDir={r / "spool"}
SlurmctldPidFile={r / "run" / "slurmctld.pid"}
SlurmdPidFile={r / "run" / "slurmd.pid"}
SlurmctldLogFile={self.log_dir / "slurmctld.log"}
SlurmdLogFile={self.log_dir / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
GresTypes=gpu
ReturnToService=2
JobRequeue=1
KillWait={KILL_WAIT_S}
MinJobAge=600
InactiveLimit=0
Waittime=0
NodeName={self.node} CPUs={self.cpus} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, cmd: list[str], **kwargs: object) -> subprocess.Popen[bytes]:
        program = _which(cmd[0])
        if program is None:
            raise SlurmUnavailable(f"{cmd[0]} not found")
        with open(self.log_dir / f"{name}.out", "ab") as out:  # the child keeps its own copy
            proc = subprocess.Popen([program, *cmd[1:]], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env, start_new_session=True,
                                    **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        self.pids[name] = proc.pid
        (self.root / "run" / f"{name}.started").write_text(f"{proc.pid}\n")
        return proc

    def _start_munge(self, timeout_s: float) -> None:
        socket_path = self.munge_dir / "munge.socket"
        d = self.munge_dir
        proc = self._spawn("munged", ["munged", "--foreground", f"--socket={socket_path}",
                                      f"--key-file={d / 'munge.key'}", f"--log-file={d / 'munged.log'}",
                                      f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"],
                           user="munge", group="munge", extra_groups=[])
        deadline = time.monotonic() + timeout_s
        while not socket_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SlurmUnavailable(f"munged did not start (exit {proc.poll()}):\n{self.logs('munged')}")
            time.sleep(0.1)

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            for proc in self._procs:
                if proc.poll() is not None:
                    raise SlurmUnavailable(f"{proc.args[0]} exited with {proc.returncode}:\n{self.logs()}")
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env, capture_output=True, text=True)
            state = (out.stdout + out.stderr).strip()
            if out.returncode == 0 and state.split()[-1:] == ["idle"]:
                return
            if out.returncode == 0 and state.split()[-1].startswith(("inval", "drain")):
                reason = self.run("sinfo", "-h", "-R").stdout.strip()
                raise SlurmUnavailable(f"node {self.node} is {state.split()[-1]}: {reason}\n{self.logs()}")
            time.sleep(0.5)
        raise SlurmUnavailable(f"node {self.node} not idle within {timeout_s:.0f} s (sinfo: {state!r}):\n{self.logs()}")

    # -- use ----------------------------------------------------------------------------------

    def run(self, *cmd: str, timeout_s: float = 30, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A SLURM client command (sbatch, scontrol, ...) against this cluster."""
        return subprocess.run(list(cmd), env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout_s)

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id))
        if out.returncode != 0:
            raise RuntimeError(f"scontrol show job {job_id}: {out.stderr.strip()}")
        fields: dict[str, str] = {}
        for word in out.stdout.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        return fields

    def logs(self, *names: str, lines: int = 20) -> str:
        """The last lines of the daemons' logs, for failure messages."""
        files = sorted(self.log_dir.glob("*")) + [self.munge_dir / "munged.log"]
        parts = []
        for f in files:
            if f.is_file() and (not names or any(n in f.name for n in names)):
                parts.append(f"--- {f.name} ---\n{_tail(f.read_text(errors='replace'), lines)}")
        return "\n".join(parts)

    # -- stop ---------------------------------------------------------------------------------

    def stop(self, remove: bool = True) -> None:
        """Cancel the jobs still there, stop the daemons this object started (by pid), and
        remove the folder (unless `remove` is False)."""
        if "slurmctld" in self.pids and self._alive(self.pids["slurmctld"]):
            self.run("scancel", "--full", "--user", str(os.getuid()), timeout_s=15)
            deadline = time.monotonic() + 3 * KILL_WAIT_S + 10
            while time.monotonic() < deadline:
                q = self.run("squeue", "-h", "-o", "%i", timeout_s=15)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _stop_pid(pid)
        for proc in self._procs:
            proc.poll()
        self._procs.clear()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _stop_pid(pid: int, timeout_s: float = 15) -> None:
    """SIGTERM, wait, then SIGKILL: one pid we started."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (the `down` command): poll it
            done = 0 if SlurmCluster._alive(pid) else pid
        if done:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def start_cluster(root: Path | None = None) -> SlurmCluster:
    """Install SLURM if needed and start a cluster; raises SlurmUnavailable with the reason."""
    if sys.platform != "linux":
        raise SlurmUnavailable(f"the SLURM test cluster needs Linux, not {sys.platform}")
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("the SLURM test cluster runs slurmctld/slurmd as root and munged as munge: not root")
    return SlurmCluster(root).start()


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__.split("\n\n")[3], file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "up":
        cluster = start_cluster(root)
        print(f"export SLURM_CONF={cluster.conf}   # pids: {cluster.pids}")
        return 0
    cluster = SlurmCluster(root)
    for name in ("slurmd", "slurmctld", "munged"):
        started = root / "run" / f"{name}.started"
        if started.is_file():
            cluster.pids[name] = int(started.read_text())
    cluster.stop(remove=False)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
