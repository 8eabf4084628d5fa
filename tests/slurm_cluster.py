"""A real single-node SLURM cluster on localhost, for tests marked ``@pytest.mark.slurm``.

The session fixture :func:`slurm_cluster` installs the Debian packages when they are missing
(``slurmctld slurmd slurm-client munge slurmdbd mariadb-server``), writes ``slurm.conf`` and
``slurmdbd.conf`` into a scratch folder and starts, in this order: a private ``munged``,
``mariadbd`` on 127.0.0.1, ``slurmdbd`` (then ``sacctmgr add cluster``), ``slurmctld`` and
``slurmd -N localhost``. Every daemon listens on a free port and keeps its state, sockets,
pid and log files in the scratch folder, so two test sessions on one machine do not meet and
nothing under ``/etc`` or ``/var`` is touched. Teardown stops every daemon by its pid, also
when the bring-up failed half way.

No cgroups are needed (``proctrack/linuxproc``, ``task/none``); it must run as root (the
daemons run as root). The cluster is tuned for fast tests: short ``MinJobAge``, ``KillWait``
and credential lifetime (which is also how long a requeued job waits before it starts again).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["SlurmCluster", "slurm_cluster", "SlurmUnavailable"]

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")
NEEDED_BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr", "munged",
                   "mariadbd", "mariadb-install-db", "mariadb")
CLUSTER_NAME = "reprotest"
NODE_CPUS = 2
NODE_MEMORY_MB = 16000


class SlurmUnavailable(RuntimeError):
    """The cluster could not be brought up for a reason outside the project (no root, no packages)."""


def _free_ports(count: int) -> list[int]:
    """Ask the kernel for ``count`` distinct free TCP ports on 127.0.0.1."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in ("/usr/sbin", "/usr/bin", "/sbin") if (Path(d) / name).is_file()), None)


def ensure_packages(timeout_s: float = 900) -> None:
    """Install the SLURM, munge and MariaDB Debian packages when a binary is missing.

    Raises:
        SlurmUnavailable: not root, no ``apt-get``, or the installation failed.
    """
    if all(_binary(b) for b in NEEDED_BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM packages are missing and installing them needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("SLURM packages are missing and there is no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:  # a stale package index is the usual cause: refresh once and retry
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=timeout_s)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise SlurmUnavailable(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    missing = [b for b in NEEDED_BINARIES if not _binary(b)]
    if missing:
        raise SlurmUnavailable(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(missing)}")


@dataclass
class SlurmCluster:
    """A private single-node SLURM (controller, node daemon, accounting) under ``scratch``.

    Attributes:
        scratch: folder holding configs, state, logs and sockets; tests may put their files here.
        env: environment for SLURM clients and for jobs submitted from tests
            (``os.environ`` without inherited ``SLURM_*`` variables, plus ``SLURM_CONF``).
        partition: the only partition (``debug``, the default one).
    """

    scratch: Path
    partition: str = "debug"
    env: dict[str, str] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # ----------------------------------------------------------------------------- paths
    @property
    def conf(self) -> Path:
        """Path of the generated ``slurm.conf``."""
        return self.scratch / "etc" / "slurm.conf"

    def log(self, daemon: str) -> Path:
        """Path of a daemon's log file (``munged``, ``mariadb``, ``slurmdbd``, ``slurmctld``, ``slurmd``)."""
        return self.scratch / "log" / f"{daemon}.log"

    # ----------------------------------------------------------------------------- helpers
    def run(self, *cmd: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command against this cluster (wrapped in ``timeout``)."""
        full = ["timeout", "-k", "2", str(int(timeout)), *cmd]
        proc = subprocess.run(full, env=self.env, capture_output=True, text=True, timeout=timeout + 5)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    def _wait(self, what: str, ready, timeout: float, log: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}"
                                       f"{self._tail(name)}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{self._tail(log) if log else ''}")

    def _tail(self, daemon: str, lines: int = 25) -> str:
        path = self.log(daemon)
        if not path.is_file():
            return ""
        return f"\n--- last lines of {path} ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def _start(self, name: str, cmd: list[str]) -> None:
        """Start a daemon in the foreground as our child; its output goes to ``log/<name>.stdout``."""
        with open(self.log(name).with_suffix(".stdout"), "ab") as out:
            self._procs[name] = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL, start_new_session=True)

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> SlurmCluster:
        """Write the configs and start every daemon; return when the node is idle.

        Raises:
            RuntimeError: a daemon failed to start (the message carries its log tail).
        """
        for sub in ("etc", "log", "run", "munge", "db", "state", "spool"):
            (self.scratch / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.scratch / "munge", 0o700)
        db_port, dbd_port, ctld_port, slurmd_port = _free_ports(4)
        munge_socket = self.scratch / "munge" / "munge.socket"
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}  # e.g. CI inside a job
        self.env = {**inherited, "SLURM_CONF": str(self.conf)}
        self._write_configs(munge_socket, db_port, dbd_port, ctld_port, slurmd_port)

        # munge: a private daemon with its own key and socket
        key = self.scratch / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._start("munged", [_binary("munged"), "--foreground", "--force", f"--socket={munge_socket}",
                               f"--key-file={key}", f"--pid-file={self.scratch / 'run' / 'munged.pid'}",
                               f"--log-file={self.log('munged')}", f"--seed-file={self.scratch / 'munge' / 'seed'}"])
        self._wait("munged", lambda: munge_socket.exists(), 15, "munged")

        # mariadb on 127.0.0.1 with a slurm user
        datadir, db_socket = self.scratch / "db" / "data", self.scratch / "db" / "mysqld.sock"
        proc = subprocess.run([_binary("mariadb-install-db"), "--user=root", f"--datadir={datadir}",
                               "--auth-root-authentication-method=normal", "--skip-test-db"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed: {proc.stdout}{proc.stderr}")
        self._start("mariadb", [_binary("mariadbd"), "--no-defaults", "--user=root", f"--datadir={datadir}",
                                "--bind-address=127.0.0.1", f"--port={db_port}", f"--socket={db_socket}",
                                f"--pid-file={self.scratch / 'run' / 'mariadb.pid'}",
                                f"--log-error={self.log('mariadb')}", "--skip-name-resolve",
                                "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M",
                                "--innodb-flush-log-at-trx-commit=0", "--skip-log-bin"])
        sql = ("CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")
        client = [_binary("mariadb"), "--no-defaults", f"--socket={db_socket}", "-uroot"]
        self._wait("mariadb", lambda: db_socket.exists() and subprocess.run(
            [*client, "-e", "SELECT 1"], capture_output=True, timeout=10).returncode == 0, 60, "mariadb")
        proc_db = subprocess.run([*client, "-e", sql], capture_output=True, text=True, timeout=20)
        if proc_db.returncode != 0:
            raise RuntimeError(f"creating the slurm database user failed: {proc_db.stderr}")

        # slurmdbd, then register the cluster (sacctmgr hangs when started out of order: hence timeout)
        self._start("slurmdbd", [_binary("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: self.run("sacctmgr", "-n", "show", "cluster", timeout=5,
                                                check=False).returncode == 0, 60, "slurmdbd")
        self.run("sacctmgr", "-i", "add", "cluster", CLUSTER_NAME, timeout=20)

        # controller and node
        self._start("slurmctld", [_binary("slurmctld"), "-D", "-i"])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", timeout=5, check=False).stdout.count("UP") > 0,
                   60, "slurmctld")
        self._start("slurmd", [_binary("slurmd"), "-D", "-N", "localhost"])
        self._wait("node localhost idle", self._node_idle, 60, "slurmd")
        return self

    def _node_idle(self) -> bool:
        proc = self.run("sinfo", "-h", "-N", "-o", "%T", timeout=5, check=False)
        return proc.returncode == 0 and proc.stdout.strip().rstrip("*") == "idle"

    def _write_configs(self, munge_socket: Path, db_port: int, dbd_port: int, ctld_port: int,
                       slurmd_port: int) -> None:
        s = self.scratch
        auth = f"socket={munge_socket},cred_expire=5"  # cred_expire: also the wait before a requeued job restarts
        self.conf.write_text("\n".join([
            f"ClusterName={CLUSTER_NAME}",
            "SlurmctldHost=localhost",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo={auth}",
            f"StateSaveLocation={s / 'state'}",
            f"SlurmdSpoolDir={s / 'spool'}",
            f"SlurmctldPidFile={s / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={s / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log('slurmctld')}",
            f"SlurmdLogFile={self.log('slurmd')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "ReturnToService=2",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2,sched_min_interval=100000",
            "MinJobAge=10",
            "KillWait=5",
            "InactiveLimit=0",
            "Waittime=0",
            "MessageTimeout=10",
            "JobRequeue=1",
            "AccountingStorageType=accounting_storage/slurmdbd",
            "AccountingStorageHost=localhost",
            f"AccountingStoragePort={dbd_port}",
            f"AccountingStoragePass=socket={munge_socket}",  # the munge socket for talking to slurmdbd
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes=localhost Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        dbd = s / "etc" / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/munge",
            f"AuthInfo=socket={munge_socket}",
            "DbdHost=localhost",
            f"DbdPort={dbd_port}",
            "SlurmUser=root",
            f"PidFile={s / 'run' / 'slurmdbd.pid'}",
            f"LogFile={self.log('slurmdbd')}",
            "DebugLevel=info",
            "StorageType=accounting_storage/mysql",
            "StorageHost=127.0.0.1",
            f"StoragePort={db_port}",
            "StorageUser=slurm",
            "StoragePass=slurm",
            "StorageLoc=slurm_acct_db",
            "",
        ]))
        os.chmod(dbd, 0o600)  # slurmdbd refuses a config readable by others

    def stop(self) -> None:
        """Stop every daemon this cluster started, by pid, the node first; safe to call twice."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:  # end leftover jobs so no slurmstepd outlives the node
            self.run("scancel", "--user", "root", timeout=10, check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", timeout=5,
                                                           check=False).stdout.strip():
                time.sleep(0.5)
        order = ["slurmd", "slurmctld", "slurmdbd", "mariadb", "munged"]
        for name in sorted(self._procs, key=lambda n: order.index(n) if n in order else -1):
            proc = self._procs[name]
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        self._procs.clear()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A running single-node SLURM cluster with accounting (see the module docstring).

    Yields:
        SlurmCluster: ``.env`` for subprocesses (``SLURM_CONF``), ``.scratch`` for files.

    Skips (with the reason) only when the packages cannot be installed or we are not root;
    a daemon that fails to start is a test error that shows its log.
    """
    try:
        ensure_packages()
    except SlurmUnavailable as exc:
        pytest.skip(f"no local SLURM: {exc}")
    except subprocess.TimeoutExpired as exc:
        pytest.skip(f"no local SLURM: package installation timed out ({exc})")
    if os.geteuid() != 0:
        pytest.skip("no local SLURM: the test cluster's daemons run as root")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
