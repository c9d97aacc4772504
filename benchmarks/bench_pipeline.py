"""Is the model kept fed? Decode, model and end-to-end throughput of videoindex, measured in one run.

    .venv/bin/python benchmarks/bench_pipeline.py [--model full|tiny] [--videos 4] [--seconds 30]
        [--size 640x360] [--device auto|cpu|cuda] [--batch-sizes 1,4,8]
        [--set execution.actor_num_cpus=1 --set execution.torch_threads=2 ...]

Input: the bundled sample videos plus ``--videos`` synthetic H.264 videos of ``--seconds`` s (cached
under ``--workdir``). Measured, all on the same input and the same sampling (sliding, stride 4):

  (a) decode-only clips/s: ``decode_video`` in one process, then as Ray tasks on every core;
  (b) model-only clips/s of ``VideoClassifier`` at each batch size (uint8 clips in, on the device);
  (c) end-to-end clips/s of ``videoindex run`` (``run_job``) with the ``--set`` execution overrides;
  (d) a naive loop the way the model card shows it: decord, the HF image processor, one forward per clip.

Printed: the table, e2e / min(decode limit, model limit), e2e / naive, the CPU split of the e2e run,
and peak RSS of the driver, a model actor and a decode worker plus object store use (first and second
half of the e2e run, to show they stay flat). On CUDA the same script runs unchanged (``--device cuda``).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MemorySampler, cpu_seconds, markdown_table, prepare_input, timed  # noqa: E402
from videoindex.config import InputConfig, JobConfig, load_config  # noqa: E402
from videoindex.executors.decode_worker import decode_task  # noqa: E402
from videoindex.format.plans import VideoTask, shard_tasks  # noqa: E402
from videoindex.job.context import decode_settings  # noqa: E402
from videoindex.stages import plan  # noqa: E402
from videoindex.stages.checkpoint import ModelInfo, resolve_model  # noqa: E402
from videoindex.stages.decode import ClipBatch, DecodeSettings, decode_inline  # noqa: E402
from videoindex.stages.model import VideoClassifier  # noqa: E402
from videoindex.stages.sampling import plan_clips  # noqa: E402

log = logging.getLogger("bench_pipeline")
CPUS = os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("full", "tiny"), default="full",
                        help="full: the default checkpoint's architecture (random weights); tiny: 2-layer test model")  # fmt: skip
    parser.add_argument("--videos", type=int, default=4, help="synthetic videos besides the 3 samples")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each synthetic video")
    parser.add_argument("--size", default="640x360", help="synthetic video WIDTHxHEIGHT")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-sizes", default="1,4,8", help="model-only batch sizes")
    parser.add_argument("--model-seconds", type=float, default=6.0, help="minimum time per model-only point")
    parser.add_argument("--naive-clips", type=int, default=16, help="clips the naive loop runs (it is slow)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="job config override for the e2e run, e.g. execution.torch_threads=2")  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "videoindex-bench")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: naive,model,decode")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ settings


def job_config(args: argparse.Namespace, folder: Path, output: Path, model_dir: Path | None) -> JobConfig:
    overrides: dict[str, Any] = {
        "input.uri": str(folder),
        "output.uri": str(output),
        "model.device": args.device,
        "execution.progress": False,
    }
    if model_dir is None:
        overrides["model.random_weights"] = True
    else:
        overrides["model.name"] = str(model_dir)
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = value.strip()
    return load_config(None, overrides)


def tiny_model_dir(workdir: Path) -> Path:
    from tests.tinymodel import make_tiny_videomae

    folder = workdir / "tiny-videomae"
    if not (folder / "config.json").exists():
        make_tiny_videomae(folder)
    return folder


def video_tasks(folder: Path) -> list[VideoTask]:
    return shard_tasks(plan.make_plan(plan.list_inputs(InputConfig(uri=str(folder))), 1_000_000))


# ------------------------------------------------------------------------------------------- decode


def decode_one_worker(tasks: list[VideoTask], settings: DecodeSettings) -> tuple[int, float, float]:
    """(clips, wall s, CPU s): every clip of every video decoded and cropped in this process, 1 thread."""
    torch.set_num_threads(1)
    clips, started, cpu = 0, time.perf_counter(), cpu_seconds()
    for event in decode_inline(tasks, settings):
        clips += len(event.clips) if isinstance(event, ClipBatch) else 0
    return clips, time.perf_counter() - started, cpu_seconds() - cpu


def _count_clips(video: VideoTask, settings: DecodeSettings) -> int:
    return sum(len(e.clips) for e in decode_task(video, settings) if isinstance(e, ClipBatch))


def decode_all_workers(tasks: list[VideoTask], settings: DecodeSettings) -> tuple[int, float]:
    """(clips, seconds): the same work as Ray tasks, one per CPU at a time, a video per task."""
    import ray

    task = ray.remote(_count_clips).options(num_cpus=1)
    ray.get([task.remote(t, settings) for t in tasks[:CPUS]])  # start the workers
    started = time.perf_counter()
    clips = sum(ray.get([task.remote(t, settings) for t in tasks]))
    return clips, time.perf_counter() - started


# -------------------------------------------------------------------------------------------- model


def model_only(
    info: ModelInfo, config: JobConfig, batch_sizes: list[int], min_s: float
) -> dict[int, tuple[float, float]]:
    """(clips/s, CPU s/clip) of VideoClassifier on random uint8 clips per batch size, torch on every core."""
    torch.set_num_threads(CPUS)
    classifier = VideoClassifier(info, config.model)
    size = info.preprocess.crop_size
    out = {}
    for batch in batch_sizes:
        clips = np.random.default_rng(0).integers(0, 256, (batch, info.num_frames, size, size, 3), np.uint8)
        classifier(clips)  # warm-up (allocator, kernels; CUDA graphs/compile when enabled)
        done, seconds, cpu = timed(lambda c=clips, f=classifier: (_sync(f(c)), len(c))[1], min_s=min_s)
        out[batch] = (done / seconds, cpu / done)
    del classifier
    gc.collect()
    return out


def _sync(_: Any) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def naive_loop(
    tasks: list[plan.VideoTask], info: ModelInfo, config: JobConfig, max_clips: int
) -> tuple[int, float]:
    """(clips, seconds) of the model card's recipe: decord clip -> image processor -> forward, batch 1.

    Same clips as the pipeline (sliding sampling), torch on every core, the device of the pipeline.
    """
    import decord
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification
    from transformers.models.videomae.image_processing_pil_videomae import VideoMAEImageProcessorPil

    torch.set_num_threads(CPUS)
    spec = info.preprocess
    processor = VideoMAEImageProcessorPil(size={"shortest_edge": spec.resize_short_side},
                                          crop_size={"height": spec.crop_size, "width": spec.crop_size},
                                          image_mean=list(spec.mean), image_std=list(spec.std))  # fmt: skip
    device = torch.device("cuda" if config.model.device != "cpu" and torch.cuda.is_available() else "cpu")
    if info.random_weights:
        torch.manual_seed(0)
        model = VideoMAEForVideoClassification(VideoMAEConfig.from_dict(info.config))
    else:
        model = VideoMAEForVideoClassification.from_pretrained(info.model_dir)
    model = model.to(device).eval()
    done, started = 0, time.perf_counter()
    for task in tasks:
        reader = decord.VideoReader(task.uri, num_threads=1, ctx=decord.cpu(0))
        for spec_clip in plan_clips(len(reader), config.sampling, info.num_frames):
            video = reader.get_batch(list(spec_clip.frame_indices)).asnumpy()
            inputs = processor(list(video), return_tensors="pt").to(device)
            with torch.no_grad():
                model(**inputs).logits.argmax(-1).item()
            done += 1
            if done >= max_clips:
                return done, time.perf_counter() - started
        del reader
    return done, time.perf_counter() - started


def timed_naive(
    tasks: list[plan.VideoTask], info: ModelInfo, config: JobConfig, clips: int
) -> tuple[int, float, float]:
    """(clips, seconds, CPU s) of one naive_loop run."""
    cpu = cpu_seconds()
    done, seconds = naive_loop(tasks, info, config, clips)
    return done, seconds, cpu_seconds() - cpu


def mean_rates(
    before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]
) -> dict[int, tuple[float, float]]:
    """Per batch size, the mean (clips/s, CPU s/clip) of the runs before and after e2e."""
    return {b: ((before[b][0] + after[b][0]) / 2, (before[b][1] + after[b][1]) / 2) for b in before}


# ------------------------------------------------------------------------------------------ end to end


def end_to_end(config: JobConfig) -> dict[str, Any]:
    """Run the job on a fresh local Ray; clips/s over the actors' busy span and over the whole call."""
    from videoindex.job.run import run_job

    shutil.rmtree(config.output.uri, ignore_errors=True)
    cpu = cpu_seconds()
    with MemorySampler() as memory:
        started = time.perf_counter()
        result = run_job(config)
        wall = time.perf_counter() - started
    cpu = {"driver": cpu_seconds() - cpu, **memory.cpu_by_role()}
    if result.exit_code != 0:
        raise RuntimeError(f"e2e run failed: {result.summary}")
    stats = [
        json.loads(p.read_text())
        for p in sorted(Path(config.output.uri, "_ledger", "committed").glob("*.json"))
    ]
    return {"clips": result.summary["clips"], "busy_cps": result.summary["clips_per_s"],
            "wall_cps": result.summary["clips"] / wall, "wall_s": wall, "memory": memory.peaks(), "memory_rss": memory.peaks(rss=True),
            "decode_s": sum(s.get("decode_s", 0) for s in stats), "infer_s": sum(s.get("infer_s", 0) for s in stats),
            "busy_s": result.summary["clips"] / result.summary["clips_per_s"], "cpu": cpu}  # fmt: skip


# ------------------------------------------------------------------------------------------- report


def machine() -> str:
    import psutil

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{CPUS} CPUs ({platform.processor() or platform.machine()}), {psutil.virtual_memory().total / 2**30:.0f} GiB, {gpu}"


def report(r: dict[str, Any], config: JobConfig) -> None:
    x, e2e, nan = config.execution, r["e2e"], float("nan")
    model = r.get("model", {})
    model_limit = max((cps for cps, _ in model.values()), default=nan)
    decode_limit = r.get("decode_all", nan)
    decode_cpu = r.get("decode_one_cpu", nan)  # CPU s per clip, decode
    cpus = "auto" if x.actor_num_cpus is None else f"{x.actor_num_cpus:g}"
    threads = x.torch_threads or ("auto" if x.actor_num_cpus is None else max(1, int(x.actor_num_cpus)))
    idle = {None: "auto", True: "on", False: "off"}[x.decode_idle_priority]
    split = (f"actor {cpus} CPU, torch_threads {threads}, decode {x.decode_num_cpus:g} CPU "
             f"x {x.decode_in_flight} in flight (idle priority {idle}), batch {x.batch_size or 'auto'}")  # fmt: skip
    e2e_cpu = sum(e2e["cpu"].values()) / e2e["clips"]
    rows = [("decode-only, 1 worker", "1 process, 1 thread", r.get("decode_one", nan), decode_cpu),
            (f"decode-only, all workers ({CPUS})", f"{CPUS} Ray tasks", decode_limit, "")]  # fmt: skip
    rows += [(f"model-only, batch {b}", f"{CPUS} torch threads", cps, c) for b, (cps, c) in model.items()]
    rows += [("end-to-end (videoindex run), busy span", split, e2e["busy_cps"], e2e_cpu),
             ("end-to-end, whole call (Ray start, model load)", "", e2e["wall_cps"], ""),
             ("naive loop (model card)", f"batch 1, {CPUS} torch threads", r.get("naive", nan), r.get("naive_cpu", ""))]  # fmt: skip
    load = f"load average {r['load'][0]:.1f} at start, {os.getloadavg()[0]:.1f} at end"
    print(
        f"\n{machine()}; {load}; {r['clips']} clips from {r['videos']} videos; {r['model_name']}; {r['device']}\n"
    )
    print(markdown_table(["measure", "setting", "clips/s", "CPU s/clip"], rows))
    if "model_pre" in r:
        pre, post = (max(cps for cps, _ in r[k].values()) for k in ("model_pre", "model_post"))
        print(f"\nmodel-only, best batch: {pre:.3f} clips/s before e2e, {post:.3f} after; the limit is "
              "their mean per batch size")  # fmt: skip
    limit = min(model_limit, decode_limit)
    print(
        f"\ne2e / min(decode limit, model limit) = {e2e['busy_cps']:.3f} / {limit:.3f} = {e2e['busy_cps'] / limit:.2f}"
    )
    print(
        f"e2e / naive = {e2e['busy_cps']:.3f} / {r.get('naive', nan):.3f} = {e2e['busy_cps'] / r.get('naive', nan):.2f}"
    )
    if r["device"] == "cpu":
        shared = 1 / (1 / model_limit + 1 / decode_limit)
        best_cpu = model.get(x.batch_size or 1, (nan, nan))[1] + decode_cpu
        print(f"decode and model share the same {CPUS} cores: shared-core bound 1/(1/d+1/m) = {shared:.3f} "
              f"clips/s (e2e / that = {e2e['busy_cps'] / shared:.2f}); CPU s per clip: model-only batch "
              f"{x.batch_size or 1} + decode-only = {best_cpu:.2f}, e2e = {e2e_cpu:.2f} (efficiency {best_cpu / e2e_cpu:.2f})")  # fmt: skip
    cpu = ", ".join(f"{k} {v:.0f} s" for k, v in e2e["cpu"].items())
    print(f"e2e: actor busy {e2e['busy_s']:.1f} s, of which model {e2e['infer_s']:.1f} s; CPU time {cpu}")
    mem = [(role, f"{a:.0f} / {b:.0f}", "{:.0f} / {:.0f}".format(*e2e["memory_rss"][role]))
           for role, (a, b) in e2e["memory"].items()]  # fmt: skip
    print("\nPeak memory during the e2e run (MiB, first half / second half; object store: bytes used):\n")
    print(markdown_table(["process", "RSS less object-store pages", "RSS"], mem))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Ray runs its workers at nice 15; the model-only and decode-only figures are taken in this process
    # (nice 0). On a machine shared with other work that alone would skew the ratios, so all run at 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    args = parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    folder = prepare_input(args.workdir, videos=args.videos, seconds=args.seconds, size=(width, height))
    print(f"input ready in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    model_dir = tiny_model_dir(args.workdir) if args.model == "tiny" else None
    config = job_config(args, folder, args.workdir / "output", model_dir)
    info = resolve_model(config.model, config.preprocess)
    settings = decode_settings(config, info)
    tasks = video_tasks(folder)
    skip = set(filter(None, args.skip.split(",")))
    device = "cuda" if config.model.device != "cpu" and torch.cuda.is_available() else "cpu"
    r: dict[str, Any] = {
        "load": os.getloadavg(),
        "videos": len(tasks),
        "model_name": info.tag,
        "device": device,
    }
    # The machine's speed drifts over minutes (model-only batch 1 moved 5-10% between runs), so the limits
    # that e2e is compared with are taken right before and right after it, and averaged.
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    half = max(1, args.naive_clips // 2)
    if "model" not in skip:
        r["model_pre"] = model_only(info, config, batch_sizes, args.model_seconds)
        print(f"model (before e2e): {r['model_pre']}", flush=True)
    if "naive" not in skip:
        r["naive_runs"] = [timed_naive(tasks, info, config, half)]
    import ray

    from videoindex.executors.ray_executor import ray_system_config

    ray.init(address="local", num_cpus=CPUS, include_dashboard=False, logging_level="WARNING",
             log_to_driver=False, _system_config=ray_system_config())  # fmt: skip
    r["e2e"] = end_to_end(config)
    r["clips"] = r["e2e"]["clips"]
    print(f"e2e: {r['e2e']['busy_cps']:.3f} clips/s", flush=True)
    if "decode" not in skip:
        clips, seconds = decode_all_workers(tasks, settings)
        r["decode_all"] = clips / seconds
    ray.shutdown()  # idle Ray workers wake 100 times a second: not while the limits are measured
    if "model" not in skip:
        r["model_post"] = model_only(info, config, batch_sizes, args.model_seconds)
        r["model"] = mean_rates(r["model_pre"], r["model_post"])
        print(f"model (after e2e): {r['model_post']}", flush=True)
    if "naive" not in skip:
        r["naive_runs"].append(timed_naive(tasks, info, config, half))
        clips, seconds, cpu = (sum(run[k] for run in r["naive_runs"]) for k in range(3))
        r["naive"], r["naive_cpu"] = clips / seconds, cpu / clips
    if "decode" not in skip:
        clips, seconds, cpu = decode_one_worker(tasks, settings)
        r["decode_one"], r["decode_one_cpu"] = clips / seconds, cpu / clips
        print(f"decode: {r['decode_one']:.2f} (1 worker), {r['decode_all']:.2f} clips/s (all)", flush=True)
    report(r, config)
    print(f"\ntotal benchmark time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
