"""How a job spreads over a cluster or one machine: actors, CPUs and GPUs per actor, batch size, decode
workers; refuses splits that cannot run.

Pure: takes the resources as data (from ``ray.cluster_resources()`` / ``ray.nodes()``, or this
machine's CPU count), so the defaults are tested without a cluster. Measured on a 2-core CPU machine (benchmarks/README.md): decode
tasks of 0.25 CPU beside one actor holding the rest keep the model fed; batch 1 is fastest on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from videoindex.config import ConfigError, JobConfig

CUDA_BATCH, CPU_BATCH = 16, 1


@dataclass(frozen=True)
class ExecutionSplit:
    actors: int
    num_gpus: float  # per actor
    num_cpus: float  # per actor
    batch_size: int
    torch_threads: int  # of each actor: execution.torch_threads, else its CPUs rounded up
    decode_idle_priority: bool = False  # decode workers yield every core to the model (CPU models)
    decode_slots: int = 0  # decode workers that run at once (local executor: its worker processes)
    decode_on_actor_node: bool = False  # ray: decode tasks pinned to their actor's node


def execution_split(
    config: JobConfig,
    resources: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]],
    shards_to_run: int,
) -> ExecutionSplit:
    """The split for this cluster. Defaults: one actor per GPU, or on a CPU cluster one actor per CPU node
    taking that node's CPUs but two decode slots (more actors than nodes share a node's CPUs). Never more
    actors than shards to run. ``nodes``: the resources of each live node (a 0-CPU head runs no actor)."""
    x = config.execution
    gpus, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    cpu_nodes = [c for n in nodes if (c := n.get("CPU", 0)) > 0]
    if config.model.device.startswith("cuda") and (not gpus or x.actor_num_gpus == 0):
        raise ConfigError(
            f"model.device is {config.model.device} but the actors get no GPU (cluster GPUs {gpus:g}, "
            f"execution.actor_num_gpus {x.actor_num_gpus}): use model.device auto or cpu, or add GPUs."
        )
    num_gpus = x.actor_num_gpus
    if num_gpus is None:
        num_gpus = 1.0 if gpus and config.model.device != "cpu" else 0.0
    actors = x.actors or (max(1, int(gpus / num_gpus)) if num_gpus else max(1, len(cpu_nodes)))
    actors = min(actors, max(1, shards_to_run))
    num_cpus = x.actor_num_cpus
    if num_cpus is None:
        per_node = math.ceil(actors / max(1, len(cpu_nodes)))
        free = min(cpu_nodes, default=1) - 2 * x.decode_num_cpus
        num_cpus = 1.0 if num_gpus else max(x.decode_num_cpus, free / per_node)
    if actors * num_gpus > gpus:
        raise ConfigError(
            f"execution: {actors} actor(s) x {num_gpus:g} GPU need {actors * num_gpus:g} GPUs but the cluster "
            f"has {gpus:g}: lower execution.actors or execution.actor_num_gpus, or set model.device: cpu."
        )
    if actors * num_cpus + x.decode_num_cpus > cpus:
        raise ConfigError(
            f"execution: {actors} actor(s) x {num_cpus:g} CPU plus one decode task ({x.decode_num_cpus:g} CPU) "
            f"need more than the cluster's {cpus:g} CPUs: decode tasks could never run. Lower "
            "execution.actors, execution.actor_num_cpus or execution.decode_num_cpus."
        )
    _check_fits_a_node(nodes, num_cpus=num_cpus, num_gpus=num_gpus, decode_cpus=x.decode_num_cpus)
    batch = x.batch_size or (CUDA_BATCH if num_gpus else CPU_BATCH)
    threads = x.torch_threads or max(1, math.ceil(num_cpus))
    idle = x.decode_idle_priority if x.decode_idle_priority is not None else not num_gpus
    local = x.decode_on_actor_node if x.decode_on_actor_node is not None else bool(num_gpus)
    return ExecutionSplit(actors=actors, num_gpus=num_gpus, num_cpus=num_cpus, batch_size=batch,
                          torch_threads=threads, decode_idle_priority=idle, decode_on_actor_node=local)  # fmt: skip


def _check_fits_a_node(nodes: Sequence[Mapping[str, float]], *, num_cpus: float, num_gpus: float,
                       decode_cpus: float) -> None:  # fmt: skip
    """Ray never places an actor or task bigger than every node: it would wait forever, so refuse now."""
    if not any(n.get("CPU", 0) >= num_cpus and n.get("GPU", 0) >= num_gpus for n in nodes):
        raise ConfigError(
            f"execution: no node has {num_cpus:g} CPU and {num_gpus:g} GPU for one actor (nodes: "
            f"{[{k: n.get(k, 0) for k in ('CPU', 'GPU')} for n in nodes]}): lower execution.actor_num_cpus "
            "or execution.actor_num_gpus."
        )
    if not any(n.get("CPU", 0) >= decode_cpus for n in nodes):
        raise ConfigError(f"execution.decode_num_cpus {decode_cpus:g} is more than any node's CPUs")


LOCAL_CPU_DECODE_WORKERS = 2  # beside a CPU model decoding needs ~4% of the cores; two keep it fed


def local_split(config: JobConfig, *, cpus: int, cuda: bool) -> ExecutionSplit:
    """The local executor's split: one model in this process with every core (CPU) or the GPU, and
    decode worker processes (execution.decode_workers; default: 2 beside a CPU model at idle priority,
    every core but one beside a GPU model, where decoding is the bottleneck)."""
    x = config.execution
    workers = x.decode_workers or (max(1, cpus - 1) if cuda else LOCAL_CPU_DECODE_WORKERS)
    idle = x.decode_idle_priority if x.decode_idle_priority is not None else not cuda
    return ExecutionSplit(actors=1, num_gpus=1.0 if cuda else 0.0, num_cpus=float(cpus),
                          batch_size=x.batch_size or (CUDA_BATCH if cuda else CPU_BATCH),
                          torch_threads=x.torch_threads or (1 if cuda else cpus),
                          decode_idle_priority=idle, decode_slots=workers)  # fmt: skip
