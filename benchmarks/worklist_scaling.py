"""`cytopipe score-slides` on a Dask LocalCluster against sequential `score-slide` (issue 18).

    python benchmarks/worklist_scaling.py --model models/calibrated --slide SLIDE [--copies 6]

Copies SLIDE --copies times into a scratch folder and times, each into a fresh output folder:
  sequential  `score_slides` in this process (the model loaded once, the shipped 2-thread schedule);
  1x2         score-slides on 1 worker process of 2 threads (one slide at a time on both);
  2x1         score-slides on 2 worker processes of 1 thread (two slides at once, one thread each);
and an empty LocalCluster's start and stop. "overhead/slide" is (1x2 - sequential - start/stop) / copies:
what the cluster costs per slide beyond the scoring itself (model load in the worker, dispatch, report).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.config import SlideConfig
from pipeline.inference.score_slide import score_slides
from pipeline.inference.worklist import Job, dask_client, run_worklist


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cluster_start_stop() -> None:
    with dask_client(None, 1, 2) as client:
        client.wait_for_workers(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--slide", required=True)
    ap.add_argument("--copies", type=int, default=6)
    args = ap.parse_args()
    cfg = SlideConfig()
    quiet = lambda *_: None  # noqa: E731
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = scratch / "slides"
        folder.mkdir()
        suffix = Path(args.slide).suffix
        slides = [shutil.copy(args.slide, folder / f"s{i}{suffix}") for i in range(args.copies)]
        results = {"cluster start/stop": timed(cluster_start_stop)}
        results["sequential"] = timed(
            lambda: score_slides([str(s) for s in slides], args.model, scratch / "seq", cfg, log=quiet)
        )
        for workers, threads in ((1, 2), (2, 1)):
            job = Job(args.model, str(scratch / f"w{workers}x{threads}"), cfg)
            results[f"{workers}x{threads}"] = timed(
                lambda: run_worklist(folder, job, workers=workers, threads=threads, progress=False, log=quiet)
            )
    n = args.copies
    for name, seconds in results.items():
        print(
            f"{name:>20}: {seconds:7.1f} s" + (f"  ({seconds / n:.1f} s/slide)" if name != "cluster start/stop" else "")
        )
    overhead = (results["1x2"] - results["sequential"] - results["cluster start/stop"]) / n
    print(f"{'overhead/slide':>20}: {overhead:7.2f} s")


if __name__ == "__main__":
    main()
