"""Find this process's place in the job, export it the way torch expects, start the process group.

Launchers and what they tell a rank:

    deepspeed launcher (pdsh or --no_ssh)  RANK WORLD_SIZE LOCAL_RANK LOCAL_SIZE CROSS_RANK MASTER_*
    torchrun                                RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK MASTER_*
    mpirun (Open MPI, MPICH)                nothing torch reads: ranks come from mpi4py
    srun (one task per GPU)                 SLURM_PROCID SLURM_STEP_NUM_TASKS SLURM_LOCALID SLURM_NODEID
    plain `python -m ...`                   nothing: world size 1

`init_distributed` turns each into RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE (mosaicml-
streaming reads it), NODE_RANK, MASTER_ADDR and MASTER_PORT, selects the GPU, and calls
`deepspeed.init_distributed` with MPI discovery off (DeepSpeed's own discovery guesses the master
address with `hostname -I` and the local rank from processor names).
"""

from __future__ import annotations

import logging
import os
import random
import socket
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from mosaicbert_ds.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0 .. world_size-1."""
    world_size: int
    """Number of processes (one per GPU)."""
    local_rank: int
    """Rank on this node; also the CUDA device index."""
    local_world_size: int
    """Processes on this node."""
    node_rank: int
    """Index of this node, 0 .. number of nodes - 1."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE", "MPI_LOCALNRANKS")


def _int(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise UserError(f"environment variable {name}={env[name]!r} is not an integer") from None
    return None


def _expand_slurm_counts(spec: str) -> list[int]:
    """'4(x2),2' -> [4, 4, 2] (SLURM_STEP_TASKS_PER_NODE's format)."""
    counts: list[int] = []
    try:
        for part in spec.split(","):
            count, _, repeat = part.partition("(x")
            counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    except ValueError:
        raise UserError(f"SLURM_STEP_TASKS_PER_NODE={spec!r} is not of the form N or N(xK),M") from None
    return counts


def take_local_rank_arg(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` / `--local_rank N` (the deepspeed launcher without --no_local_rank
    puts it before the command) and export it as LOCAL_RANK where the launcher did not."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq:
                value = argv[i + 1] if i + 1 < len(argv) else ""
                i += 1
            if not value.isdigit():
                raise UserError(f"{name} must be a non-negative integer, got {value!r}")
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(arg)
        i += 1
    return out


def free_port() -> int:
    """A TCP port nothing listens on now, below the kernel's ephemeral range where one is free.

    The port is listened on later (by the rendezvous store); outgoing connections of any process
    take their ports from the ephemeral range, so a port below it cannot be taken by one of them
    in between."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for port in random.sample(range(max(low - 12000, 1024), low), 50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def discover(env: MutableMapping[str, str] | None = None) -> DistInfo:
    """Work out this process's place from the launcher's variables and export the torch ones.

    Writes RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR and MASTER_PORT
    into `env` (os.environ by default); values the launcher already set are kept.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:  # deepspeed launcher or torchrun
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK")
        if local_rank is None:
            raise UserError(
                "RANK and WORLD_SIZE are set but LOCAL_RANK is not: launch with the deepspeed "
                "launcher, torchrun, mpirun or srun (see launch/README.md)"
            )
        local_world = _int(env, "LOCAL_WORLD_SIZE", "LOCAL_SIZE") or world
        node_rank = _int(env, "GROUP_RANK", "CROSS_RANK", "NODE_RANK")  # launcher-set first
        if node_rank is None:
            node_rank = rank // local_world  # homogeneous nodes
    elif any(marker in env for marker in _MPI_MARKERS):
        rank, world, local_rank, local_world, node_rank = _from_mpi(env)
    elif "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:  # inside an srun step
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        local_rank, node_rank = _int(env, "SLURM_LOCALID") or 0, _int(env, "SLURM_NODEID") or 0
        per_node = _expand_slurm_counts(env.get("SLURM_STEP_TASKS_PER_NODE", str(world)))
        local_world = per_node[node_rank] if node_rank < len(per_node) else per_node[0]
        if "MASTER_ADDR" not in env:
            if _int(env, "SLURM_STEP_NUM_NODES") not in (None, 1):
                raise UserError(
                    "under srun on several nodes set MASTER_ADDR to the first node "
                    "(launch/slurm.sbatch does: scontrol show hostnames)"
                )
            env["MASTER_ADDR"] = "127.0.0.1"
    else:  # a plain process
        rank, world, local_rank, local_world, node_rank = 0, 1, 0, 1, 0
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))

    if not (0 <= rank < world and 0 <= local_rank < local_world and 0 <= node_rank):
        raise UserError(
            f"inconsistent launcher variables: rank {rank} of {world}, local rank {local_rank} "
            f"of {local_world}, node rank {node_rank}"
        )
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(local_world),
        NODE_RANK=str(node_rank),
    )
    return DistInfo(rank, world, local_rank, local_world, node_rank)


def _from_mpi(env: MutableMapping[str, str]) -> tuple[int, int, int, int, int]:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks that share this node's memory
    local_rank, local_world = node.Get_rank(), node.Get_size()
    # Nodes are numbered by the global rank of their first process.
    leader = node.bcast(rank, root=0)
    node_rank = sorted(set(comm.allgather(leader))).index(leader)
    node.Free()
    # Rank 0 names itself (its hostname, which the other nodes must resolve; set MASTER_ADDR to an
    # address to override) and picks a free port on its own host, where the TCP store will listen.
    master = (env.get("MASTER_ADDR") or socket.gethostname(), env.get("MASTER_PORT") or str(free_port()))
    env["MASTER_ADDR"], env["MASTER_PORT"] = comm.bcast(master if rank == 0 else None, root=0)
    return rank, world, local_rank, local_world, node_rank


def init_distributed(backend: str | None = None, use_cuda: bool | None = None) -> DistInfo:
    """Discover the job (see `discover`), pick the CUDA device and start the process group.

    backend: "nccl" on CUDA and "gloo" on CPU when None. use_cuda: whether this process drives a
    GPU (default: when one is visible). Pretraining and finetuning both start their groups here.
    """
    import torch

    info = discover()
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    device = None
    if use_cuda:
        count = torch.cuda.device_count()
        # One visible GPU per task (srun --gpus-per-task) means device 0 whatever the local rank.
        device = 0 if count == 1 else info.local_rank
        if device >= count:
            raise UserError(f"local rank {info.local_rank} but only {count} GPUs are visible on this node")
        torch.cuda.set_device(device)
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if not torch.cuda.is_available():
        # DeepSpeed builds its CPU communication op through torch.utils.cpp_extension, whose import
        # warns "No CUDA runtime is found" wherever a CUDA toolkit is installed without a GPU: not
        # a problem of a CPU run, and it would stand before every one-line error of the run.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

    import deepspeed

    _start_group_on_own_store(info, backend, device)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    unlink_cpu_allreduce_buffers(info)
    share_host_memory(info)
    return info


def unlink_cpu_allreduce_buffers(info: DistInfo) -> None:
    """Remove the names of DeepSpeed's CPU all-reduce buffers once every rank has mapped them.

    With all ranks on one host and no GPU, DeepSpeed's shm communication op gives each rank a
    69 MB buffer `/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>` and never
    removes it: every CPU run would leave its buffers in memory until the host reboots. After a
    barrier (each rank has opened every peer's buffer), each rank unlinks its own name; the
    mappings stay valid and the memory is freed when the last rank exits, also after a crash."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
    name += f"{os.environ.get('MASTER_PORT', '')}_{info.rank}"
    if info.world_size > 1:  # on every rank, whether or not DeepSpeed made buffers (GPU runs)
        import torch.distributed as dist

        dist.barrier()
    (Path("/dev/shm") / name).unlink(missing_ok=True)


def _start_group_on_own_store(info: DistInfo, backend: str, device: int | None) -> None:
    """Start the process group where torch's default rendezvous would go wrong (elsewhere DeepSpeed
    starts it from the environment, and finds a group started here and uses it).

    One process: an in-process store. A TCP store would listen on MASTER_PORT, a port found free
    when the job was discovered; by the time it listens, another process's connection can hold it
    (EADDRINUSE), and a single process has no peer that needs the port.

    Under torchrun: the keys of this restart attempt only. torchrun's workers share the agent's TCP
    store, which lives as long as the job, and torch does not prefix the workers' keys per attempt:
    after a `--max-restarts` restart the ranks would read the dead attempt's gloo addresses or NCCL
    ids and fail to connect. A prefix with TORCHELASTIC_RESTART_COUNT gives every attempt its own
    keys."""
    import torch
    import torch.distributed as dist
    from deepspeed.constants import default_pg_timeout

    extra = {"device_id": torch.device("cuda", device)} if device is not None else {}
    if info.world_size == 1:
        store = dist.HashStore()
    elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        agent = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            info.world_size,
            is_master=False,
            timeout=default_pg_timeout,
        )
        store = dist.PrefixStore(f"mosaicbert_ds/attempt_{attempt}", agent)
    else:
        return
    dist.init_process_group(
        backend, store=store, rank=info.rank, world_size=info.world_size, timeout=default_pg_timeout, **extra
    )


def ranks_per_host(hosts: list[str], node_rank_of: list[int]) -> int | None:
    """Ranks per host when several node ranks share a host (else None), from every rank's host id.

    mosaicml-streaming keeps one set of shared-memory names per node (/dev/shm is per host), so
    node ranks on one host must count as one streaming node: each host a contiguous block of the
    same number of ranks. Raises UserError when the hosts are not laid out that way."""
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    if all(len({node_rank_of[r] for r in ranks}) == 1 for ranks in by_host.values()):
        return None
    sizes = {len(ranks) for ranks in by_host.values()}
    blocks = all(ranks == list(range(ranks[0], ranks[0] + len(ranks))) for ranks in by_host.values())
    if len(sizes) != 1 or not blocks:
        shared = next(h for h, ranks in by_host.items() if len({node_rank_of[r] for r in ranks}) > 1)
        raise UserError(
            f"node ranks {sorted({node_rank_of[r] for r in by_host[shared]})} share host {shared!r}, "
            "but not as equal, contiguous blocks of ranks per host; streaming's shared memory is per "
            "host: give every host the same number of consecutive node ranks"
        )
    return sizes.pop()


def shared_memory_id() -> str:
    """This host's name and the device of its /dev/shm: ranks with equal ids share POSIX shared memory
    (a rank in a private /dev/shm mount, as a container has, gets another id)."""
    try:
        device = os.stat("/dev/shm").st_dev
    except OSError:
        device = 0
    return f"{socket.gethostname()}:{device}"


def share_host_memory(info: DistInfo) -> None:
    """Where several node ranks run on one host (two `--no_ssh` launchers on one machine), set
    LOCAL_WORLD_SIZE to the ranks of the host, so streaming makes one set of shared memory per host
    (otherwise both node leaders create the same names: FileExistsError). One all-gather at start."""
    import torch.distributed as dist

    if info.world_size == 1:
        return
    pairs: list[tuple[str, int] | None] = [None] * info.world_size
    dist.all_gather_object(pairs, (shared_memory_id(), info.node_rank))
    per_host = ranks_per_host([p[0] for p in pairs], [p[1] for p in pairs])
    if per_host is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(per_host)


# Variables a launch must hand to every rank (launch/env.sh sets them); the check reports them.
LAUNCH_ENV = (
    "NCCL_NVLS_ENABLE",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST",
    "NVSHMEM_DISABLE_NVLS",
    "NCCL_SOCKET_IFNAME",
    "NCCL_IB_HCA",
    "NCCL_DEBUG",
    "DEEPSPEED_TIMEOUT",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING",
)


def main(argv: list[str] | None = None) -> int:
    """Launch check: `MBDS_MODULE=mosaicbert_ds.train.distributed launch/<mode>.sh RUN ...`.

    Starts the process group the way training does, all-reduces rank+1 and writes one JSON line
    per rank (place, sum, launch variables, arguments) prefixed "mbds-launch-check". The
    arguments (`pretrain RUN ...` from the launch scripts) are only echoed.
    """
    import json
    import sys
    from dataclasses import asdict

    import torch
    import torch.distributed as dist

    argv = take_local_rank_arg(list(sys.argv[1:] if argv is None else argv))
    info = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    total = torch.tensor([float(info.rank + 1)], device=device)
    dist.all_reduce(total)
    expected = info.world_size * (info.world_size + 1) / 2
    record = {
        **asdict(info),
        "sum": total.item(),
        "ok": total.item() == expected,
        "argv": argv,
        "env": {
            name: os.environ.get(name)
            for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "NODE_RANK", *LAUNCH_ENV)
        },
    }
    sys.stdout.write(f"mbds-launch-check {json.dumps(record)}\n")  # one write: ranks share the pipe
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
