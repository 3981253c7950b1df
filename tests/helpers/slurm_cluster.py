"""A throwaway single-node SLURM cluster on this machine, for the launch tests.

`Cluster(root).start()` runs a private munged (own key and socket under `root`), slurmctld and
slurmd, all configured by `root/slurm.conf` (the local node with the cores and memory `slurmd -C`
reports, state, spool and logs under `root`, free TCP ports, no cgroups: proctrack/linuxproc,
task/none). Clients find the cluster through `Cluster.env` (SLURM_CONF). `stop()` ends the three
daemons by the PIDs this module started (never by name) and the jobs they still run. The daemons
run in the foreground as children of the test process and get SIGTERM if it dies.

`unavailable_reason()` says why a cluster cannot be started here (packages not installed, not
root): the tests skip with that reason. Install the packages with
`apt-get install slurmctld slurmd slurm-client munge` (Debian/Ubuntu; CI's .ci/run does it).

A requeued job may start again REQUEUE_DELAY_S after the requeue (slurm.conf's
AuthInfo=cred_expire; SLURM's default is 120 s). slurmctld checks time limits and `--signal` lead
times every 30 s (a compile-time period): a job with `--time=2 --signal=TERM@60` gets its signal
60-90 s after it starts, and is killed for its time limit at least 30 s after that.
"""

import ctypes
import ctypes.util
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = {
  'munged': '/usr/sbin/munged',
  'slurmctld': '/usr/sbin/slurmctld',
  'slurmd': '/usr/sbin/slurmd',
}
CLIENTS = ('sbatch', 'scontrol', 'scancel', 'squeue', 'srun', 'munge')
INSTALL_HINT = 'apt-get install slurmctld slurmd slurm-client munge'
REQUEUE_DELAY_S = 20
FINAL_STATES = (
  'COMPLETED',
  'FAILED',
  'CANCELLED',
  'TIMEOUT',
  'NODE_FAIL',
  'OUT_OF_MEMORY',
  'PREEMPTED',
  'BOOT_FAIL',
  'DEADLINE',
)


def unavailable_reason() -> str | None:
  """None when a cluster can be started here, else why not (one line naming the fix)."""
  missing = [p for p in DAEMONS.values() if not os.access(p, os.X_OK)]
  missing += [c for c in CLIENTS if shutil.which(c) is None]
  if missing:
    return f'SLURM/munge not installed (missing {", ".join(missing)}): run `{INSTALL_HINT}`'
  if os.geteuid() != 0:
    return (
      'the local SLURM cluster runs slurmd as root (it starts jobs as their user): run the '
      'SLURM tests as root, e.g. in a container'
    )
  return None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _node_line() -> str:
  """`slurmd -C`'s NodeName line (this machine's real CPUs/cores/memory), addressed on 127.0.0.1."""
  out = subprocess.run(
    [DAEMONS['slurmd'], '-C'], capture_output=True, text=True, check=True, timeout=60
  ).stdout
  line = next(l for l in out.splitlines() if l.startswith('NodeName='))
  return f'{line} NodeAddr=127.0.0.1 State=UNKNOWN'


@dataclasses.dataclass
class Job:
  """One `scontrol show job` record (the fields the tests read)."""

  job_id: str
  state: str
  exit_code: str  # 'rc:signal' of the batch script, as SLURM reports it.
  restarts: int
  reason: str
  raw: dict


class Cluster:
  """A single-node SLURM cluster whose files all live under `root`."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self.conf = os.path.join(self.root, 'slurm.conf')
    self.node = socket.gethostname().split('.')[0]
    self.procs: dict[str, subprocess.Popen] = {}

  @property
  def env(self) -> dict:
    """Environment additions of every SLURM client call (and the daemons)."""
    return {'SLURM_CONF': self.conf}

  def client_env(self, base: dict | None = None) -> dict:
    """`base` (default os.environ) without inherited SLURM_* job variables, pointed at this
    cluster."""
    e = {
      k: v for k, v in (os.environ if base is None else base).items() if not k.startswith('SLURM_')
    }
    e.update(self.env)
    return e

  def _path(self, *parts) -> str:
    return os.path.join(self.root, *parts)

  def _write_config(self) -> None:
    munge_socket = self._path('munge', 'socket', 'munge.sock')
    lines = [
      'ClusterName=dolgtest',
      f'SlurmctldHost={self.node}(127.0.0.1)',
      f'SlurmctldPort={_free_port()}',
      f'SlurmdPort={_free_port()}',
      'SlurmUser=root',
      'SlurmdUser=root',
      'AuthType=auth/munge',
      'CredType=cred/munge',
      # cred_expire (default 120 s) is also how long a requeued job waits before it may start
      # again: short here so that the requeue tests take seconds.
      f'AuthInfo=socket={munge_socket},cred_expire={REQUEUE_DELAY_S}',
      f'StateSaveLocation={self._path("state")}',
      f'SlurmdSpoolDir={self._path("spool")}',
      f'SlurmctldPidFile={self._path("slurmctld.pid")}',
      f'SlurmdPidFile={self._path("slurmd.pid")}',
      f'SlurmctldLogFile={self._path("slurmctld.log")}',
      f'SlurmdLogFile={self._path("slurmd.log")}',
      'SlurmctldDebug=info',
      'SlurmdDebug=info',
      # No cgroups in a container: processes tracked by parentage, no task binding.
      'ProctrackType=proctrack/linuxproc',
      'TaskPlugin=task/none',
      'JobAcctGatherType=jobacct_gather/none',
      'AccountingStorageType=accounting_storage/none',
      'JobCompType=jobcomp/none',
      'MpiDefault=none',
      'SwitchType=switch/none',
      'SelectType=select/cons_tres',
      'SelectTypeParameters=CR_Core',
      'SchedulerType=sched/builtin',
      'SchedulerParameters=sched_interval=2',  # Pending jobs tested every 2 s (default 60).
      'ReturnToService=2',
      'MinJobAge=3600',  # Finished jobs stay visible to `scontrol show job`.
      'KillWait=10',  # SIGTERM -> SIGKILL at a time limit / scancel.
      'OverTimeLimit=0',
      'InactiveLimit=0',
      'MessageTimeout=20',
      'SlurmctldTimeout=300',
      'SlurmdTimeout=300',
      'JobRequeue=1',
      _node_line(),
      f'PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP',
    ]
    with open(self.conf, 'w') as f:
      f.write('\n'.join(lines) + '\n')

  def _start_munge(self) -> None:
    # munged insists on: a key readable only by its owner, a socket directory every user can
    # traverse, and private state directories.
    mdir = self._path('munge')
    os.makedirs(self._path('munge', 'socket'))
    os.chmod(self.root, 0o755)
    os.chmod(mdir, 0o755)
    os.chmod(self._path('munge', 'socket'), 0o755)
    key = os.path.join(mdir, 'munge.key')
    with open(key, 'wb') as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    self._spawn(
      [
        DAEMONS['munged'],
        '--foreground',
        f'--socket={mdir}/socket/munge.sock',
        f'--key-file={key}',
        f'--pid-file={mdir}/munged.pid',
        f'--log-file={mdir}/munged.log',
        f'--seed-file={mdir}/munged.seed',
      ],
      'munged',
      os.path.join(mdir, 'socket', 'munge.sock'),
      os.path.join(mdir, 'munged.log'),
    )

  def _spawn(
    self, cmd: list[str], name: str, ready_file: str, log: str, timeout: float = 60
  ) -> None:
    """Starts a daemon in the foreground as a child of this process (it gets SIGTERM if this
    process dies, so an aborted test session leaves no daemon behind) and waits until it has
    written `ready_file`."""
    with open(self._path(f'{name}.out'), 'w') as out:
      proc = subprocess.Popen(
        cmd,
        env=self.client_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
      )
    self.procs[name] = proc
    deadline = time.time() + timeout
    while not os.path.exists(ready_file):
      if proc.poll() is not None or time.time() > deadline:
        raise RuntimeError(
          f'{name} did not start (rc={proc.poll()}; no {ready_file})\n'
          f'{self._tail(self._path(f"{name}.out"))}\n{self._tail(log)}'
        )
      time.sleep(0.1)

  @staticmethod
  def _tail(path: str, n: int = 4000) -> str:
    try:
      with open(path, errors='replace') as f:
        return f'--- {path} ---\n{f.read()[-n:]}'
    except OSError:
      return f'({path} not written)'

  def start(self, timeout: float = 60) -> 'Cluster':
    for d in ('state', 'spool'):
      os.makedirs(self._path(d))
    self._start_munge()
    self._write_config()
    # -D: foreground; -i: ignore state from an earlier cluster (none: fresh StateSaveLocation).
    self._spawn(
      [DAEMONS['slurmctld'], '-D', '-i', '-f', self.conf],
      'slurmctld',
      self._path('slurmctld.pid'),
      self._path('slurmctld.log'),
    )
    self._spawn(
      [DAEMONS['slurmd'], '-D', '-f', self.conf],
      'slurmd',
      self._path('slurmd.pid'),
      self._path('slurmd.log'),
    )
    deadline = time.time() + timeout
    state = ''
    while time.time() < deadline:
      state = self.scontrol('show', 'node', self.node, check=False).stdout
      m = re.search(r'State=(\S+)', state)
      if m and m.group(1).split('+')[0] in ('IDLE', 'MIXED', 'ALLOCATED'):
        return self
      time.sleep(0.5)
    raise RuntimeError(f'node {self.node} not idle within {timeout:.0f} s:\n{state}\n{self.logs()}')

  def logs(self) -> str:
    return '\n'.join(self._tail(self._path(n)) for n in ('slurmctld.log', 'slurmd.log'))

  def stop(self) -> None:
    """Cancels the remaining jobs, then ends slurmd, slurmctld and munged by PID."""
    if 'slurmctld' in self.procs:
      subprocess.run(
        ['scancel', '--full', '--signal=KILL', '--user=root'],
        env=self.client_env(),
        capture_output=True,
        timeout=60,
        check=False,
      )
      subprocess.run(
        ['scancel', '--user=root'],
        env=self.client_env(),
        capture_output=True,
        timeout=60,
        check=False,
      )
    for name in ('slurmd', 'slurmctld', 'munged'):
      proc = self.procs.pop(name, None)
      if proc is None or proc.poll() is not None:
        continue
      os.kill(proc.pid, signal.SIGTERM)
      try:
        proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)

  # Clients.

  def cmd(
    self,
    *args: str,
    check: bool = True,
    env: dict | None = None,
    cwd: str | None = None,
    timeout: float = 60,
  ) -> subprocess.CompletedProcess:
    proc = subprocess.run(
      list(args), env=self.client_env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
      raise RuntimeError(
        f'{" ".join(args)} failed (rc={proc.returncode}): {proc.stderr.strip()}\n{self.logs()}'
      )
    return proc

  def scontrol(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return self.cmd('scontrol', *args, check=check)

  def sbatch(self, *args: str, env: dict | None = None, cwd: str | None = None) -> str:
    """Submits; returns the job id."""
    out = self.cmd('sbatch', '--parsable', *args, env=env, cwd=cwd).stdout.strip()
    return out.split(';')[0]

  def job(self, job_id: str) -> Job:
    out = self.scontrol('show', 'job', '--oneliner', job_id).stdout
    raw = dict(kv.split('=', 1) for kv in out.split() if '=' in kv)
    return Job(
      job_id=job_id,
      state=raw['JobState'],
      exit_code=raw['ExitCode'],
      restarts=int(raw.get('Restarts', 0)),
      reason=raw.get('Reason', ''),
      raw=raw,
    )

  def wait(self, job_id: str, until, timeout: float, what: str = '') -> Job:
    """Polls the job until `until(job)` holds; raises naming the last state after `timeout`, or
    at once when the job ended without it."""
    deadline = time.time() + timeout
    job = self.job(job_id)
    while not until(job):
      if time.time() > deadline or job.state in FINAL_STATES:
        raise AssertionError(
          f'job {job_id}: {what or "condition"} not reached (waited up to '
          f'{timeout:.0f} s); last state {job.state} (reason {job.reason}, '
          f'exit {job.exit_code}, restarts {job.restarts})\n{self.logs()}'
        )
      time.sleep(0.5)
      job = self.job(job_id)
    return job

  def wait_final(self, job_id: str, timeout: float) -> Job:
    return self.wait(job_id, lambda j: j.state in FINAL_STATES, timeout, 'a final state')

  def task_pids(self, job_id: str) -> dict[int, int]:
    """{SLURM_PROCID: pid} of the Python processes of this job's srun steps (read from /proc:
    the job runs on this machine)."""
    found = {}
    for d in os.listdir('/proc'):
      if not d.isdigit():
        continue
      try:
        with open(f'/proc/{d}/cmdline', 'rb') as f:
          argv0 = f.read().split(b'\0')[0].decode(errors='replace')
        if not os.path.basename(argv0).startswith('python'):
          continue
        with open(f'/proc/{d}/environ', 'rb') as f:
          environ = dict(
            kv.split('=', 1) for kv in f.read().decode(errors='replace').split('\0') if '=' in kv
          )
      except OSError:
        continue
      if (
        environ.get('SLURM_JOB_ID') == job_id
        and 'SLURM_PROCID' in environ
        and 'SLURM_STEP_ID' in environ
        and environ['SLURM_STEP_ID'] != 'batch'
      ):
        found[int(environ['SLURM_PROCID'])] = int(d)
    return found


def _die_with_parent() -> None:
  """In the child before exec: SIGTERM when the parent (the test process) dies."""
  libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True)
  libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
