"""`cytopipe score-slides` on Dask against sequential `score-slide` (issue 18).

    python benchmarks/worklist_scaling.py --model models/exported --slide SLIDE [--copies 6] [--regions 0]
        [--two-machines]

Copies SLIDE --copies times into a scratch folder, adds --regions slides cut from its centre (square, of a
quarter, a third, a half... of its side: a cohort of mixed sizes), and times, each into a fresh output folder
and one after the other in one run (this machine's speed varies from day to day):
  sequential    `score_slides` in this process (the model loaded once, the shipped 2-thread schedule);
  1x2           score-slides on a LocalCluster of 1 worker process of 2 threads (one slide at a time);
  2x1           score-slides on 2 worker processes of 1 thread (two slides at once, one thread each);
  two machines  (--two-machines) `dask scheduler` and two `dask worker --nthreads 1 --resources slide=1`
                started as separate processes on 127.0.0.1 with DASK_CONFIG=configs/dask, each worker pinned
                to one core with taskset, and score-slides --scheduler; its cells are compared with the
                sequential run's;
and an empty LocalCluster's start and stop.

"dispatch/slide" is what a cluster run costs beyond scoring: (wall - start/stop - the slides' own seconds
summed, from done.json) / copies, for the 1x2 run, where slides run one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import SlideConfig
from pipeline.inference.score_slide import score_slides
from pipeline.inference.worklist import Job, dask_client, run_worklist

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cluster_start_stop() -> None:
    with dask_client(None, 1, 2) as client:
        client.wait_for_workers(1)


@contextmanager
def two_machines(scratch: Path):
    """A `dask scheduler` and two one-core `dask worker`s as separate processes on loopback; the address."""
    dask = str(Path(sys.executable).with_name("dask"))
    env = {**os.environ, "DASK_CONFIG": str(ROOT / "configs" / "dask")}
    file = scratch / "scheduler.json"
    common = ["--no-dashboard", "--host", "127.0.0.1"]
    log = open(scratch / "dask.log", "ab")  # noqa: SIM115 - the processes' logs, closed with them
    start = lambda cmd: subprocess.Popen(cmd, env=env, stdout=log, stderr=log)  # noqa: E731
    procs = [start([dask, "scheduler", "--port", "0", "--scheduler-file", str(file), *common])]
    try:
        while not file.exists():
            time.sleep(0.2)
        worker = ["worker", "--scheduler-file", str(file), "--nthreads", "1", "--resources", "slide=1", *common]
        for core in (0, 1):
            procs.append(start(["taskset", "-c", str(core), dask, *worker]))
        address = json.loads(file.read_text())["address"]
        from distributed import Client

        with Client(address) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=60)
        log.close()


def write_regions(slide: str, folder: Path, n: int) -> list[Path]:
    """n square regions from the slide's centre, sides 1/4, 1/3, 1/2, ... of its shorter side, each written
    as a tiled deflate pyramid TIFF at the slide's µm per pixel, which OpenSlide's generic-tiff reads (tifffile
    writes JPEG only with imagecodecs, not a dependency)."""
    import tifffile

    from pipeline.wsi.readers import open_slide

    paths = []
    with open_slide(slide, None) as source:
        width, height = source.dimensions
        resolution = {"resolution": (1e4 / source.mpp, 1e4 / source.mpp), "resolutionunit": "CENTIMETER"}
        for i in range(n):
            side = min(width, height) // max(2, 4 - i)
            level = source.read_region((width - side) // 2, (height - side) // 2, side, side)
            path = folder / f"region{i}_{side}px.tiff"
            with tifffile.TiffWriter(path) as tw:
                while True:
                    sub = 0 if level.shape[0] == side else 1
                    tw.write(
                        level,
                        tile=(256, 256),
                        photometric="rgb",
                        subfiletype=sub,
                        compression="zlib",
                        compressionargs={"level": 1},
                        **resolution,
                    )
                    if max(level.shape[:2]) <= 512:
                        break
                    h, w = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
                    level = level[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).astype(np.uint8)
            paths.append(path)
    return paths


def slide_seconds(out: Path) -> float:
    return sum(json.loads(p.read_text())["seconds"] for p in out.glob("*/done.json"))


def compare(reference: Path, other: Path) -> str:
    """Every slide's cells.csv against the reference run's, the cells matched by their box: how many match,
    whether their calls are equal, and the largest score differences. (Cells are matched by box, not by
    cell_id: a box 2 px off on one core moves the ids of the cells after it in the same row.)"""
    box = ["x0", "y0", "x1", "y1"]
    n_ref = n_other = matched = calls_differ = 0
    score_diff = ood_diff = 0.0
    for ref in sorted(reference.glob("*/cells.csv")):
        a, b = pd.read_csv(ref), pd.read_csv(other / ref.parent.name / "cells.csv")
        both = a.merge(b, on=box, suffixes=("_a", "_b"))
        n_ref, n_other, matched = n_ref + len(a), n_other + len(b), matched + len(both)
        calls_differ += int((both["call_a"] != both["call_b"]).sum())
        score_diff = max(score_diff, float(np.nanmax(np.abs(both["score_a"] - both["score_b"]), initial=0)))
        ood_diff = max(ood_diff, float(np.nanmax(np.abs(both["ood_score_a"] - both["ood_score_b"]), initial=0)))
    return (
        f"cells {n_other} vs {n_ref}, {n_ref - matched} boxes differ; calls differ {calls_differ}; "
        f"max |score diff| {score_diff:.1e}, OOD {ood_diff:.1e}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--slide", required=True)
    ap.add_argument("--copies", type=int, default=6)
    ap.add_argument("--regions", type=int, default=0, help="slides cut from the slide's centre, of mixed sizes")
    ap.add_argument("--two-machines", action="store_true", help="also time a scheduler and two 1-core workers")
    args = ap.parse_args()
    cfg, n = SlideConfig(), args.copies + args.regions
    quiet = lambda *_: None  # noqa: E731
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        folder = scratch / "slides"
        folder.mkdir()
        suffix = Path(args.slide).suffix
        slides = [shutil.copy(args.slide, folder / f"s{i}{suffix}") for i in range(args.copies)]
        slides += write_regions(args.slide, folder, args.regions)
        results = {"cluster start/stop": timed(cluster_start_stop)}
        results["sequential"] = timed(
            lambda: score_slides([str(s) for s in slides], args.model, scratch / "seq", cfg, log=quiet)
        )
        runs = {f"{w}x{t}": dict(workers=w, threads=t) for w, t in ((1, 2), (2, 1))}
        if args.two_machines:
            runs["two machines"] = {}
        checks = {}
        for name, setup in runs.items():
            out = scratch / name.replace(" ", "_")
            job = Job(args.model, str(out), cfg)
            if setup:
                results[name] = timed(lambda: run_worklist(folder, job, **setup, progress=False, log=quiet))
            else:
                with two_machines(scratch) as address:
                    results[name] = timed(
                        lambda: run_worklist(folder, job, scheduler=address, progress=False, log=print)
                    )
            checks[name] = compare(scratch / "seq", out)
            if name == "1x2":
                dispatch = (results[name] - results["cluster start/stop"] - slide_seconds(out)) / n
    for name, seconds in results.items():
        per_slide = f"  ({seconds / n:.1f} s/slide)" if name != "cluster start/stop" else ""
        print(f"{name:>20}: {seconds:7.1f} s{per_slide}  {checks.get(name, '')}")
    print(f"{'dispatch/slide (1x2)':>20}: {dispatch:7.2f} s")


if __name__ == "__main__":
    main()
