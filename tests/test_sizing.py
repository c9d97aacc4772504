"""How a job spreads over a cluster, from the cluster's resources as data (no Ray needed)."""

from __future__ import annotations

import pytest

from videoindex.config import ConfigError, load_config
from videoindex.job.sizing import ExecutionSplit, execution_split


def _config(**overrides):
    return load_config(None, {"input.uri": "/in", "output.uri": "/out", **overrides})


def _split(resources, node_cpus, shards=100, node_gpus=None, **overrides) -> ExecutionSplit:
    gpus = node_gpus or [resources.get("GPU", 0) / len(node_cpus)] * len(node_cpus)
    nodes = [{"CPU": c, "GPU": g} for c, g in zip(node_cpus, gpus, strict=True)]
    return execution_split(_config(**overrides), resources, nodes, shards)


def test_cpu_laptop_one_actor_keeps_two_decode_slots() -> None:
    assert _split({"CPU": 2}, [2]) == ExecutionSplit(
        actors=1, num_gpus=0.0, num_cpus=1.5, batch_size=1, torch_threads=2, decode_idle_priority=True
    )


def test_cpu_cluster_one_actor_per_node_and_a_cpu_less_head_runs_none() -> None:
    split = _split({"CPU": 24}, [0, 8, 8, 8])
    assert (split.actors, split.num_cpus, split.torch_threads) == (3, 7.5, 8)


def test_more_actors_than_nodes_share_a_node() -> None:
    split = _split({"CPU": 16}, [8, 8], **{"execution.actors": 4})
    assert (split.actors, split.num_cpus, split.torch_threads) == (4, 3.75, 4)


def test_gpu_cluster_one_actor_per_gpu_batch_16() -> None:
    split = _split({"CPU": 32, "GPU": 4}, [16, 16])
    assert split == ExecutionSplit(
        actors=4,
        num_gpus=1.0,
        num_cpus=1.0,
        batch_size=16,
        torch_threads=1,
        decode_idle_priority=False,
        decode_on_actor_node=True,
    )
    on_cpu = _split({"CPU": 32, "GPU": 4}, [16, 16], **{"model.device": "cpu"})
    assert (on_cpu.num_gpus, on_cpu.batch_size, on_cpu.decode_idle_priority) == (0.0, 1, True)


def test_decode_idle_priority_follows_the_model_device_unless_set() -> None:
    """Idle-priority decoding yields the cores to a CPU model; beside GPUs decoding is the bottleneck."""
    assert _split({"CPU": 2}, [2], **{"execution.decode_idle_priority": False}).decode_idle_priority is False
    forced = _split({"CPU": 32, "GPU": 4}, [16, 16], **{"execution.decode_idle_priority": True})
    assert forced.decode_idle_priority is True


def test_never_more_actors_than_shards_and_explicit_settings_win() -> None:
    assert _split({"CPU": 24, "GPU": 8}, [8, 8, 8], shards=3).actors == 3
    split = _split({"CPU": 2}, [2], **{"execution.actor_num_cpus": 0.5, "execution.batch_size": 8,
                                       "execution.torch_threads": 3})  # fmt: skip
    assert (split.num_cpus, split.batch_size, split.torch_threads) == (0.5, 8, 3)


@pytest.mark.parametrize(
    ("resources", "overrides", "message"),
    [
        ({"CPU": 2}, {"execution.actors": 2, "execution.actor_num_cpus": 1}, "decode tasks could never run"),
        ({"CPU": 2}, {"execution.actor_num_gpus": 1}, "need 1 GPUs but the cluster has 0"),
        ({"CPU": 8, "GPU": 2}, {"execution.actors": 3}, "need 3 GPUs but the cluster has 2"),
        ({"CPU": 2}, {"model.device": "cuda"}, "model.device is cuda but the actors get no GPU"),
    ],
)
def test_splits_that_cannot_run_are_refused(resources, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        _split(resources, [resources["CPU"]], **overrides)


def test_an_actor_bigger_than_every_node_is_refused() -> None:
    """4 GPUs in total, but one per node: an actor asking for 2 could never be placed."""
    with pytest.raises(ConfigError, match="no node has 1 CPU and 2 GPU"):
        _split({"CPU": 32, "GPU": 4}, [8, 8, 8, 8], **{"execution.actor_num_gpus": 2})
    with pytest.raises(ConfigError, match="decode_num_cpus 12 is more than any node"):
        _split({"CPU": 32}, [8, 8, 8, 8], **{"execution.decode_num_cpus": 12, "execution.actor_num_cpus": 1})


def test_decode_runs_on_the_actor_node_with_gpus_unless_set() -> None:
    gpu_nodes = [{"CPU": 8, "GPU": 1}] * 2
    assert execution_split(_config(), {"CPU": 16, "GPU": 2}, gpu_nodes, 10).decode_on_actor_node
    assert not execution_split(_config(), {"CPU": 16}, [{"CPU": 8}] * 2, 10).decode_on_actor_node
    spread = _config(**{"execution.decode_on_actor_node": False})
    assert not execution_split(spread, {"CPU": 16, "GPU": 2}, gpu_nodes, 10).decode_on_actor_node


def test_local_split_gives_the_model_the_cores_and_decoding_the_rest() -> None:
    from videoindex.job.sizing import local_split

    cpu = local_split(_config(), cpus=16, cuda=False)
    assert (cpu.batch_size, cpu.torch_threads, cpu.decode_slots, cpu.decode_idle_priority) == (1, 16, 2, True)
    gpu = local_split(_config(), cpus=16, cuda=True)
    assert (gpu.batch_size, gpu.torch_threads, gpu.decode_slots, gpu.decode_idle_priority) == (
        16,
        1,
        15,
        False,
    )
    chosen = local_split(
        _config(**{"execution.decode_workers": 3, "execution.batch_size": 2}), cpus=4, cuda=False
    )
    assert (chosen.decode_slots, chosen.batch_size) == (3, 2)
