r"""Joining a multi-process run: the local launcher, a cluster JAX starts itself, or one process.

    from experiments import distributed
    how = distributed.initialize()   # first, before any other JAX call; "single", "local" or a cluster name

`initialize()` picks the first of:

  1. "local": the variables of `experiments/launch_local.py` (`POFX_COORDINATOR_ADDRESS`,
     `POFX_NUM_PROCESSES`, `POFX_PROCESS_ID`; optional `POFX_INIT_TIMEOUT`,
     `POFX_HEARTBEAT_TIMEOUT` in seconds) are passed to `jax.distributed.initialize`. They come
     first because they are set on purpose (the launcher may itself run inside a SLURM job).
  2. a cluster: `jax.distributed.initialize()` with no arguments, so that JAX's own cluster
     detection reads the coordinator address, the process count and this process's index. The
     environments recognised here are those JAX detects, checked the way JAX checks them and in
     its order (`detect_cluster`):
       "ompi"   Open MPI's `mpirun`/`mpiexec`: `OMPI_MCA_orte_hnp_uri` is set.
       "slurm"  a SLURM job step (`srun`): `SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_NTASKS`,
                `SLURM_PROCID` and `SLURM_LOCALID` are set. JAX takes the coordinator from the
                first host of `SLURM_STEP_NODELIST`, on port 61440 + `SLURM_JOB_ID` mod 4096
                (`JAX_COORDINATOR_PORT` overrides the port), and on GPUs gives each process the
                device `SLURM_LOCALID` (one task per GPU).
       "tpu"    a Cloud TPU VM (TPU chips on the PCI bus, `libtpu` installed): the workers of a
                pod slice find each other through the TPU metadata (GCE) or
                `TPU_WORKER_HOSTNAMES`/`TPU_PROCESS_ADDRESSES` (GKE).
       "k8s"    a Kubernetes Indexed Job (`KUBERNETES_SERVICE_HOST` and `JOB_COMPLETION_INDEX` are
                set, the `kubernetes` package is installed): JAX reads the job through the API.
     A SLURM step or an Open MPI run of one task is left single-process.
  3. "single": nothing to join; one process.

In a multi-process run every process runs the same program; process 0 (`jax.process_index()
== 0`) writes the summaries, metrics and charts (`experiments/main.py`).
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import Callable, Mapping, Optional

import jax

# The variables of `experiments/launch_local.py`.
ENV_COORDINATOR = "POFX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "POFX_NUM_PROCESSES"
ENV_PROCESS_ID = "POFX_PROCESS_ID"
ENV_INIT_TIMEOUT = "POFX_INIT_TIMEOUT"
ENV_HEARTBEAT_TIMEOUT = "POFX_HEARTBEAT_TIMEOUT"

# What JAX's cluster classes read (jax._src.clusters), in JAX's order of detection.
OMPI_URI = "OMPI_MCA_orte_hnp_uri"
OMPI_SIZE = "OMPI_COMM_WORLD_SIZE"
SLURM_VARIABLES = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
K8S_VARIABLES = ("KUBERNETES_SERVICE_HOST", "JOB_COMPLETION_INDEX")
CLUSTERS = ("ompi", "slurm", "tpu", "k8s")

_GOOGLE_PCI_VENDOR = "0x1ae0"
# PCI device ids of TPU chips (v3, v4, v5p, v5e, v6e, 7x and one unnamed), as JAX lists them.
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def tpu_chips_on_this_host() -> int:
  """The number of TPU chips attached through PCI (what JAX counts to recognise a Cloud TPU VM)."""
  n = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR:
          continue
      with open(os.path.join(os.path.dirname(vendor), "device")) as f:
        n += f.read().strip() in _TPU_PCI_DEVICES
    except OSError:
      continue
  return n


def _installed(module: str) -> bool:
  return importlib.util.find_spec(module) is not None


def detect_cluster(
  env: Optional[Mapping[str, str]] = None,
  *,
  tpu_chips: Callable[[], int] = tpu_chips_on_this_host,
  installed: Callable[[str], bool] = _installed,
) -> Optional[str]:
  """The cluster environment this process runs in (one of `CLUSTERS`), or None.

  Checks, in JAX's order, the conditions under which `jax.distributed.initialize()` finds its
  arguments itself (see the module docstring). `tpu_chips` and `installed` are the probes of the
  host (replaced in tests).
  """
  env = os.environ if env is None else env
  if OMPI_URI in env:
    return "ompi"
  if all(k in env for k in SLURM_VARIABLES):
    return "slurm"
  if tpu_chips() > 0 and installed("libtpu"):
    return "tpu"
  if all(k in env for k in K8S_VARIABLES) and installed("kubernetes"):
    return "k8s"
  return None


def _cluster_size(cluster: str, env: Mapping[str, str]) -> Optional[int]:
  """The process count the cluster announces in the environment (None: known only to JAX)."""
  if cluster == "slurm":
    return int(env["SLURM_NTASKS"])
  if cluster == "ompi" and OMPI_SIZE in env:
    return int(env[OMPI_SIZE])
  return None


def initialize(
  env: Optional[Mapping[str, str]] = None,
  *,
  initialize_fn: Optional[Callable[..., None]] = None,
  detect: Callable[[Mapping[str, str]], Optional[str]] = detect_cluster,
) -> str:
  """Joins the multi-process run this process belongs to; returns how: "local", a cluster name or "single".

  Call it first, before any other JAX call (see the module docstring for the order). `env`
  defaults to `os.environ`; `initialize_fn` to `jax.distributed.initialize` (replaced in tests).
  """
  env = os.environ if env is None else env
  init = jax.distributed.initialize if initialize_fn is None else initialize_fn
  if ENV_NUM_PROCESSES in env:
    missing = [k for k in (ENV_COORDINATOR, ENV_PROCESS_ID) if k not in env]
    if missing:
      raise ValueError(
        f"distributed.initialize: {ENV_NUM_PROCESSES} is set but {missing} are not (they are set "
        "together by experiments/launch_local.py)."
      )
    init(
      coordinator_address=env[ENV_COORDINATOR],
      num_processes=int(env[ENV_NUM_PROCESSES]),
      process_id=int(env[ENV_PROCESS_ID]),
      initialization_timeout=int(env.get(ENV_INIT_TIMEOUT, 120)),
      heartbeat_timeout_seconds=int(env.get(ENV_HEARTBEAT_TIMEOUT, 30)),
    )
    return "local"
  cluster = detect(env)
  if cluster is None or _cluster_size(cluster, env) == 1:
    return "single"
  init()
  return cluster
