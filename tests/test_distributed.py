"""experiments.distributed: which way a process joins a run (local launcher, a cluster, or alone), checked
against JAX's own cluster detection; and a simulated SLURM job step of two local processes that form
one 2-process JAX runtime (4 CPU devices, a psum over all of them) through `jax.distributed`'s own
SLURM start. A real cluster is not at hand here: SLURM is simulated by its variables."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
from jax._src import clusters as jax_clusters

from experiments import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = os.path.join(REPO, "tests", "distributed_check.py")

SLURM = {
  "SLURM_JOB_ID": "4242",
  "SLURM_STEP_NODELIST": "node[001-002]",
  "SLURM_NTASKS": "2",
  "SLURM_PROCID": "1",
  "SLURM_LOCALID": "0",
}
OMPI = {
  "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
  "OMPI_COMM_WORLD_SIZE": "4",
  "OMPI_COMM_WORLD_RANK": "2",
  "OMPI_COMM_WORLD_LOCAL_RANK": "0",
}
LOCAL = {"POFX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "POFX_NUM_PROCESSES": "2", "POFX_PROCESS_ID": "1"}
_NONE = dict(tpu_chips=lambda: 0, installed=lambda m: False)


def _is_cluster_variable(name):
  return name.startswith(
    ("SLURM_", "OMPI_", "POFX_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JAX_COORDINATOR", "JOB_COMPLETION_INDEX")
  )


def test_detect_cluster():
  assert distributed.detect_cluster({}, **_NONE) is None
  assert distributed.detect_cluster(SLURM, **_NONE) == "slurm"
  assert distributed.detect_cluster(OMPI, **_NONE) == "ompi"
  assert distributed.detect_cluster({**SLURM, **OMPI}, **_NONE) == "ompi"  # JAX's order: Open MPI first
  # A SLURM allocation outside a job step (sbatch's own shell) has no SLURM_STEP_NODELIST: not a run to join.
  assert distributed.detect_cluster({k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}, **_NONE) is None
  assert distributed.detect_cluster({}, tpu_chips=lambda: 4, installed=lambda m: m == "libtpu") == "tpu"
  assert distributed.detect_cluster({}, tpu_chips=lambda: 4, installed=lambda m: False) is None  # no libtpu
  k8s = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}
  assert distributed.detect_cluster(k8s, tpu_chips=lambda: 0, installed=lambda m: m == "kubernetes") == "k8s"
  assert (
    distributed.detect_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, tpu_chips=lambda: 0, installed=lambda m: True)
    is None
  )  # one pod, not an Indexed Job
  assert distributed.detect_cluster(k8s, **_NONE) is None  # the kubernetes package is missing
  assert distributed.tpu_chips_on_this_host() >= 0


@pytest.mark.parametrize("env, cls", [(SLURM, jax_clusters.SlurmCluster), (OMPI, jax_clusters.OmpiCluster)])
def test_detection_agrees_with_jax(monkeypatch, env, cls):
  """JAX's own cluster class recognises the environment that `detect_cluster` recognises, and not
  one variable less; JAX's first detected cluster is the same one."""
  for k in list(os.environ):
    if _is_cluster_variable(k):
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert cls.is_env_present() and distributed.detect_cluster(**_NONE) == cls.name
  first = next(c for c in jax_clusters.ClusterEnv._cluster_types if not c.opt_in_only_method and c.is_env_present())
  assert first is cls
  key = sorted(env)[0]
  monkeypatch.delenv(key)
  assert cls.is_env_present() == (distributed.detect_cluster(**_NONE) == cls.name)


def test_initialize_picks_local_then_cluster_then_single():
  calls = []
  init = lambda **kw: calls.append(kw)
  never = lambda env: pytest.fail("the cluster must not be consulted")
  assert distributed.initialize({}, initialize_fn=init, detect=lambda env: None) == "single" and calls == []
  # The local launcher's variables win, even inside a SLURM job step.
  assert distributed.initialize({**LOCAL, **SLURM}, initialize_fn=init, detect=never) == "local"
  assert calls.pop() == {
    "coordinator_address": "127.0.0.1:1234",
    "num_processes": 2,
    "process_id": 1,
    "initialization_timeout": 120,
    "heartbeat_timeout_seconds": 30,
  }
  # On a cluster JAX reads the cluster's variables itself: no arguments.
  assert distributed.initialize(SLURM, initialize_fn=init, detect=lambda env: "slurm") == "slurm"
  assert calls.pop() == {}
  assert (
    distributed.initialize({**SLURM, "SLURM_NTASKS": "1"}, initialize_fn=init, detect=lambda env: "slurm") == "single"
    and calls == []
  )
  assert distributed.initialize({}, initialize_fn=init, detect=lambda env: "tpu") == "tpu" and calls.pop() == {}
  with pytest.raises(ValueError, match="POFX_PROCESS_ID"):
    distributed.initialize({"POFX_NUM_PROCESSES": "2", "POFX_COORDINATOR_ADDRESS": "127.0.0.1:1"}, initialize_fn=init)


def _free_slurm_port():
  """A free port among those JAX's SLURM start can pick (61440 + SLURM_JOB_ID mod 4096)."""
  for port in random.sample(range(61440, 65536), 64):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      try:
        s.bind(("", port))
      except OSError:
        continue
      return port
  pytest.skip("no free port in 61440-65535")


def test_simulated_slurm_step_forms_one_two_process_runtime():
  """Two local processes with the variables `srun --ntasks=2` sets on one node join one runtime
  through `jax.distributed.initialize()`'s SLURM detection; 2 CPU devices each, a psum over 4."""
  host = socket.gethostname()
  port = _free_slurm_port()
  job_id = 4096 * 1000 + port - 61440  # JAX derives the coordinator port from the job id
  base = {k: v for k, v in os.environ.items() if not _is_cluster_variable(k)}
  flags = [f for f in base.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform")]
  base.update(
    {
      "XLA_FLAGS": " ".join([*flags, "--xla_force_host_platform_device_count=2"]),  # the suite's flags stay
      "JAX_PLATFORMS": "cpu",
      "SLURM_JOB_ID": str(job_id),
      "SLURM_NTASKS": "2",
      "SLURM_STEP_NODELIST": host,
      "SLURM_NODELIST": host,
      "SLURM_STEP_NUM_NODES": "1",
      "SLURM_JOB_NUM_NODES": "1",
      "SLURM_NNODES": "1",
    }
  )
  procs = [
    subprocess.Popen(
      [sys.executable, CHECK],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env={**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_NODEID": "0"},
    )
    for i in range(2)
  ]
  reports = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=60)
      assert p.returncode == 0, err[-3000:]
      reports.append(json.loads(out.strip().splitlines()[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, r in enumerate(reports):
    assert r["how"] == "slurm" and r["process"] == i and r["processes"] == 2, r
    assert r["devices"] == 4 and r["local"] == 2, r
    assert r["sum"] == 1111.0, r  # 10**0 + ... + 10**3: every device of both processes took part
  assert sorted(reports[0]["mine"] + reports[1]["mine"]) == [0, 1, 2, 3]
