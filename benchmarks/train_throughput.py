"""Training throughput: full data pipeline + train step vs. the bare train step, in one run.

    python benchmarks/train_throughput.py [--params params.yaml] [--split data/split/split.csv]

The full path draws batches from the cached dataset through the train augmentation preset and
the DataLoader; the bare path repeats the train step on one pre-made batch. Both use the same
model, optimizer, threads and memory format. This CPU is noisy, so the two paths alternate in
rounds after a warm-up and the median per round is reported. Target: full / bare >= 0.8.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--split", default="data/split/split.csv")
    ap.add_argument("--batches", type=int, default=5, help="timed batches per path per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median reported)")
    args = ap.parse_args()

    import torch
    from torch.utils.data import DataLoader

    from pipeline.config import LabelMap, load_params
    from pipeline.data.dataset import CellDataset
    from pipeline.data.manifest import SPLIT_COLUMNS, read_table
    from pipeline.models.backbones import build_model, preprocessing

    params = load_params(args.params)
    cfg, mcfg = params.train, params.model
    threads = cfg.num_threads or os.cpu_count()
    torch.set_num_threads(threads)
    labels = LabelMap.load(params.data.label_map).labels
    split = read_table(args.split, SPLIT_COLUMNS)
    rows = split[split["split"] == "train"]
    model = build_model(mcfg.arch, len(labels), mcfg.weights, mcfg.drop_rate)
    mean, std = preprocessing(mcfg, model)
    t0 = time.perf_counter()
    ds = CellDataset.from_frame(rows, params.data.root, labels, mcfg.image_size, cfg.augment, mean, std)
    cache_s = time.perf_counter() - t0
    model.train().to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    def step(x, y):
        loss = loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    import statistics

    n, bs = args.batches, cfg.batch_size
    loader = DataLoader(
        ds, bs, shuffle=True, drop_last=True, num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(0)
    )

    def batches():
        while True:
            yield from loader

    stream = batches()
    x, y = next(stream)
    for _ in range(3):  # warm-up: allocator, oneDNN kernels
        step(x, y)
    full_rounds, bare_rounds = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for _ in range(n):
            step(*next(stream))
        full_rounds.append(n * bs / (time.perf_counter() - start))
        start = time.perf_counter()
        for _ in range(n):
            step(x, y)
        bare_rounds.append(n * bs / (time.perf_counter() - start))
    full, bare = statistics.median(full_rounds), statistics.median(bare_rounds)

    print(
        f"model {mcfg.arch} @ {mcfg.image_size}px, batch {bs}, {threads} threads, "
        f"augment '{cfg.augment}', num_workers {cfg.num_workers}; decode cache of {len(ds)} images built in {cache_s:.1f}s"
    )
    print(f"{'path':<38}{'images/s':>10}")
    print(f"{'full data pipeline + train step':<38}{full:>10.1f}")
    print(f"{'bare train step (pre-made batch)':<38}{bare:>10.1f}")
    print(f"{'ratio full / bare (target >= 0.8)':<38}{full / bare:>10.2f}")


if __name__ == "__main__":
    main()
