"""Dask distributed against Ray for `cytopipe score-slides` (issue 18): start-up and memory per worker.

    python benchmarks/dask_vs_ray.py --model models/exported [--workers 2]

Ray is not a dependency of cytopipe; install it into the environment for this comparison only
(`pip install ray`), or the script measures Dask alone. For each engine, one after the other in one run:
  start      a local cluster of --workers worker processes on 127.0.0.1, until a no-op task on each returns;
  load       the first task on each worker: import the scoring code and load the model (what a worker pays
             once, before its first slide);
  RSS        each worker process's resident memory after that load (psutil), and the same right after start;
             and the sum over every process the engine started (workers; Ray's raylet, GCS and agents too);
  stop       closing the cluster.
The two-machine set-up is two commands for either engine (`dask scheduler` / `dask worker ADDRESS`,
`ray start --head` / `ray start --address ADDRESS`); docs/worklist.md compares what else each needs.
"""

from __future__ import annotations

import argparse
import os
import time


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load_and_measure(model: str) -> tuple[int, float, float]:
    """(pid, seconds to import the scoring code and load the model, RSS in MiB after it)."""
    t = time.perf_counter()
    from pipeline.config import SlideConfig
    from pipeline.inference.score_slide import load_model

    load_model(model, SlideConfig())
    return os.getpid(), time.perf_counter() - t, rss_mib()


def children_rss_mib() -> float:
    """Resident memory of every process this one started (workers, and Ray's raylet, GCS and agents)."""
    import psutil

    total = 0
    for child in psutil.Process().children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def idle(i: int) -> tuple[int, float]:
    time.sleep(0.5)  # long enough that each worker takes one
    return os.getpid(), rss_mib()


def dask_engine(model: str, workers: int) -> dict:
    from pipeline.inference.worklist import dask_client

    t = time.perf_counter()
    with dask_client(None, workers, 1) as client:
        client.wait_for_workers(workers)
        idle_rss = dict(client.gather(client.map(idle, range(workers), pure=False)))
        start = time.perf_counter() - t
        t = time.perf_counter()
        loads = client.run(load_and_measure, model)  # once on every worker
        load = time.perf_counter() - t
        children = children_rss_mib()
        t = time.perf_counter()
    stop = time.perf_counter() - t
    return {
        "start": start,
        "load": load,
        "idle": idle_rss,
        "loaded": {p: r for p, _, r in loads.values()},
        "stop": stop,
        "children": children,
    }


def ray_engine(model: str, workers: int) -> dict:
    import ray

    t = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    remote_idle = ray.remote(num_cpus=1)(idle)
    idle_rss = dict(ray.get([remote_idle.remote(i) for i in range(workers)]))
    start = time.perf_counter() - t
    t = time.perf_counter()
    remote_load = ray.remote(num_cpus=1)(load_and_measure)
    loads = ray.get([remote_load.remote(model) for _ in range(workers)])  # one per worker: num_cpus=1 each
    load = time.perf_counter() - t
    children = children_rss_mib()
    t = time.perf_counter()
    ray.shutdown()
    stop = time.perf_counter() - t
    return {
        "start": start,
        "load": load,
        "idle": idle_rss,
        "loaded": {p: r for p, _, r in loads},
        "stop": stop,
        "children": children,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    engines = {"dask": dask_engine}
    try:
        import ray  # noqa: F401

        engines["ray"] = ray_engine
    except ImportError:
        print("ray is not installed: measuring Dask only (pip install ray to compare)")
    for name, engine in engines.items():
        r = engine(args.model, args.workers)
        idle_rss = ", ".join(f"{v:.0f}" for v in r["idle"].values())
        loaded = ", ".join(f"{v:.0f}" for v in r["loaded"].values())
        print(
            f"{name:>5}: start {r['start']:5.1f} s, first load {r['load']:5.1f} s, stop {r['stop']:4.1f} s; "
            f"worker RSS idle [{idle_rss}] MiB, with the model [{loaded}] MiB; "
            f"all processes it started {r['children']:.0f} MiB"
        )


if __name__ == "__main__":
    main()
