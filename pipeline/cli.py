"""`cytopipe`: one subcommand per stage.

Argument parsing only. Each command imports what it needs when it runs, so `--help`
stays instant and never loads torch, timm, mlflow or albumentations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import CytopipeError
from pipeline.registry import DEFAULT_MODEL  # light: the model card module and no MLflow until a URI needs it

DESCRIPTION = """\
Pap cytology classification pipeline (benign / malignant).

Stages (also run by `dvc repro`, parameters from params.yaml):
  ingest   validate images into a manifest (+ rejects report)
  split    grouped, stratified train/val/test split and CV folds
  train    fine-tune the backbone, track in MLflow, register the model
  evaluate calibrate on val, measure test with CIs, promote; or measure any labelled folder
  cv       grouped k-fold cross-validation (MLflow parent run + one child run per fold)
  export   ONNX model + metadata.json, validated against torch, registered in MLflow

For pathologists:
  predict      score image files or folders: calibrated probability and call per file
  score-slide  score whole slides: cells.csv, summary.json, heat map and report.html each
  score-slides score a worklist of slides on Dask (resumable): a report each, worklist.csv and .html
  harvest      cut a slide's reviewed, labelled cells into a training dataset (for ingest)
  view         review a scored slide in the browser: deep zoom, cell overlay, labels saved to labels.csv
"""


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", metavar="YAML", help="parameter file (default: %(default)s)")


def _ingest_sources(args: argparse.Namespace, data) -> tuple:
    """The sources `cytopipe ingest` reads: data.sources, or one built from the flags. `--source` makes a
    source of its own, which never takes another source's group rule: without --group-regex or
    --group-column, a CSV manifest with a `group` column is grouped by it (see ingest.effective_group_rule)."""
    from pipeline.config import DataSource, GroupRule, default_source_name

    flagged_rule = (
        GroupRule(regex=args.group_regex, column=args.group_column) if args.group_regex or args.group_column else None
    )
    if not (args.source or args.label_map or flagged_rule):
        return data.source_list()
    first = data.first_source
    if args.source:
        return (
            DataSource(default_source_name(args.source), args.source, args.label_map or first.label_map, flagged_rule),
        )
    return (DataSource(first.name, first.path, args.label_map or first.label_map, flagged_rule or first.group),)


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError, load_params
    from pipeline.data import ingest
    from pipeline.data.images import ImageLimits

    data = load_params(args.params).data
    limits = ImageLimits(data.min_side, data.max_pixels)
    sources = _ingest_sources(args, data)
    if args.only:  # one of data.sources on its own (a per-source DVC stage)
        by_name = {s.name: s for s in sources}
        if args.only not in by_name:
            raise ConfigError(
                f"{args.params}: --only {args.only}: no such source in data.sources (has: {', '.join(by_name)})"
            )
        src = by_name[args.only]
        ingest.run(src.path, src.label_map, src.group, limits, args.out)
    elif args.merge or len(sources) > 1:
        ingest.run_sources(sources, limits, args.out, merge_from=args.merge)
    else:
        ingest.run(sources[0].path, sources[0].label_map, sources[0].group, limits, args.out)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from pipeline.config import load_params
    from pipeline.data import split

    config = load_params(args.params).split
    if args.seed is not None:
        config = replace(config, seed=args.seed)
    if args.folds is not None:
        config = replace(config, folds=args.folds)
    split.run(args.manifest, config, args.out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline import train
    from pipeline.config import load_params

    if args.nproc > 1 or args.nnodes > 1:
        from pipeline.distributed import launch

        world = args.nproc * args.nnodes
        batch = load_params(args.params).train.batch_size
        if batch % world:  # checked here too, so a bad config fails before any process starts
            raise train.TrainingError(
                f"train.batch_size {batch} must divide by the {world} processes (it is the global batch)"
            )

        forward = [
            "train",
            "--params",
            args.params,
            "--split",
            args.split,
            "--manifest",
            args.manifest,
            "--out",
            args.out,
            "--checkpoints",
            args.checkpoints,
            "--reports",
            args.reports,
        ]
        forward += ["--resume"] if args.resume else ["--fresh"] if args.fresh else []
        return launch(forward, args.nproc, args.nnodes, args.rdzv_endpoint)
    params = load_params(args.params)
    resume = "require" if args.resume else "never" if args.fresh else "auto"
    result, metrics = train.run(params, args.split, args.manifest, args.out, args.checkpoints, args.reports, resume)
    if not metrics:  # a torchrun worker other than rank 0
        return 0
    trained = (
        f"train+val for {result.epochs_run} epochs (final train loss {result.history[-1]['train_loss']:.4f}; "
        "calibrate it on the cv stage's out-of-fold predictions)"
        if params.train.fit_on == "train+val"
        else f"best val AUC {result.best_val_auc:.4f} at epoch {result.best_epoch} of {result.epochs_run}"
        + (" (stopped early)" if result.stopped_early else "")
    )
    print(
        f"train: {trained}" + f"; model -> {args.out}; MLflow run {metrics['mlflow_run_id']}, "
        f"{params.mlflow.registered_model} v{metrics['model_version']} @{params.mlflow.alias}"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline import evaluate, evaluate_folder
    from pipeline.config import load_params

    params = load_params(args.params)
    if args.data:
        if not args.label_map:
            raise SystemExit("cytopipe evaluate: error: --data needs --label-map")
        evaluate_folder.evaluate_folder(
            args.model or DEFAULT_MODEL,
            Path(args.data),
            Path(args.label_map),
            Path(args.out or "reports/evaluate-folder"),
            params.evaluate,
            group_regex=args.group_regex,
            tta=args.tta,
            tracking_uri=_tracking_uri(params),
        )
        return 0
    evaluate.run(
        params,
        Path(args.model or "models/train"),
        Path(args.split),
        Path(args.out or "models/calibrated"),
        Path(args.reports),
        oof_csv=Path(args.oof) if args.oof else None,
        atypia_json=Path(args.atypia) if args.atypia else None,
        atypia_metrics=Path(args.atypia_metrics) if args.atypia_metrics else None,
    )
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    from pipeline import cv
    from pipeline.config import load_params

    cv.run(load_params(args.params), Path(args.split), Path(args.reports), Path(args.work))
    return 0


def cmd_morphometry(args: argparse.Namespace) -> int:
    from pipeline import morphometry_stage
    from pipeline.config import load_params

    morphometry_stage.run(
        load_params(args.params),
        Path(args.split),
        Path(args.oof) if args.oof else None,
        Path(args.out),
        Path(args.reports),
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline import export
    from pipeline.config import load_params

    export.run(load_params(args.params), Path(args.model), Path(args.split), Path(args.out), Path(args.reports))
    return 0


def _params_or_defaults(path: str):
    """Inference commands run anywhere: use params.yaml when present, defaults otherwise."""
    from pipeline.config import DataConfig, Params, SplitConfig, load_params

    return load_params(path) if Path(path).is_file() else Params(DataConfig(), SplitConfig())


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.inference.files import predict_paths

    params = _params_or_defaults(args.params)
    return predict_paths(
        args.paths,
        args.model,
        args.out,
        args.tta,
        _tracking_uri(params),
        args.batch_size,
        args.workers,
        args.morphometry,
    )


def _slide_scoring(args: argparse.Namespace):
    """(params, the slide settings with --batch-size applied) for score-slide and score-slides."""
    from dataclasses import replace

    params = _params_or_defaults(args.params)
    return params, params.slide if args.batch_size is None else replace(params.slide, batch_size=args.batch_size)


def cmd_score_slide(args: argparse.Namespace) -> int:
    from pipeline.inference.score_slide import score_slides

    params, cfg = _slide_scoring(args)
    return score_slides(
        args.slides,
        args.model,
        Path(args.out),
        cfg,
        mpp=args.mpp,
        top=args.top,
        tta=args.tta,
        tracking_uri=_tracking_uri(params),
    )


def cmd_score_slides(args: argparse.Namespace) -> int:
    from pipeline.inference.worklist import Job, run_worklist

    params, cfg = _slide_scoring(args)
    job = Job(args.model, str(Path(args.out).resolve()), cfg, _tracking_uri(params), args.mpp, args.top, args.tta)
    return run_worklist(args.worklist, job, args.scheduler, args.workers, args.threads)


def cmd_harvest(args: argparse.Namespace) -> int:
    from pipeline import harvest

    margin = _params_or_defaults(args.params).slide.crop_margin  # the crop recipe scoring used
    harvest.run(args.slide, args.cells, args.labels, args.out, margin, args.slide_id, class_map_path=args.class_map)
    return 0


def cmd_view(args: argparse.Namespace) -> int:
    from pipeline.viewer.server import serve

    server = serve(args.report_dir, args.slide, args.port, verbose=args.verbose)
    host, port = server.server_address[:2]
    report = server.report
    if report.slide_error:
        print(f"cytopipe view: warning: {report.slide_error}", file=sys.stderr)
    print(f"cytopipe view: {report.dir} on http://{host}:{port}/ (labels -> {report.labels.path}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _tracking_uri(params) -> str:
    from pipeline.tracking import tracking_uri

    return tracking_uri(params.mlflow)


def _add_ingest(sub) -> None:
    p = sub.add_parser(
        "ingest",
        help="validate images into a manifest",
        description="Validate a folder of class subfolders (or a CSV manifest with columns "
        "path,class[,group]) into manifest.csv, rejects.csv and summary.json.",
    )
    _add_params(p)
    p.add_argument("--source", help="image folder or CSV manifest, ingested alone (default: data.sources in params)")
    p.add_argument("--label-map", help="label map YAML (default: the first source's in data.sources)")
    group = p.add_mutually_exclusive_group()  # with --source and neither: a CSV's `group` column, else file names
    group.add_argument("--group-regex", help="regex over the file name; its first capture group is the group")
    group.add_argument(
        "--group-column",
        help="CSV manifest column that holds the group (default for a CSV "
        "--source: its `group` column when it has one)",
    )
    several = p.add_mutually_exclusive_group()
    several.add_argument(
        "--only",
        metavar="NAME",
        help="ingest only this source of data.sources (its paths and groups as in the source itself)",
    )
    several.add_argument(
        "--merge",
        metavar="DIR",
        help="merge DIR/<name>/ (outputs of --only) for every source in "
        "data.sources instead of reading the images again",
    )
    p.add_argument("--out", default="data/ingest", metavar="DIR", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_ingest)


def _add_split(sub) -> None:
    p = sub.add_parser(
        "split",
        help="grouped, stratified train/val/test split and CV folds",
        description="Assign whole groups to train/val/test (stratified by class, seeded) and "
        "to CV folds; write split.csv and summary.json and print a count table.",
    )
    _add_params(p)
    p.add_argument("--manifest", default="data/ingest/manifest.csv", help="manifest from ingest (default: %(default)s)")
    p.add_argument("--seed", type=int, help="override split.seed")
    p.add_argument("--folds", type=int, help="override split.folds (0 = no CV folds)")
    p.add_argument("--out", default="data/split", metavar="DIR", help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_split)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune the backbone (tracked in MLflow)",
        description="Fine-tune the configured backbone on the train split, early-stop on "
        "validation AUC, checkpoint every epoch, log the run to MLflow and register "
        "the best model. An unfinished run of the same config resumes automatically.",
    )
    _add_params(p)
    p.add_argument("--split", default="data/split/split.csv", help="split file (default: %(default)s)")
    p.add_argument(
        "--manifest", default="data/ingest/manifest.csv", help="manifest, for provenance (default: %(default)s)"
    )
    p.add_argument("--out", default="models/train", metavar="DIR", help="model folder (default: %(default)s)")
    p.add_argument(
        "--checkpoints",
        default="checkpoints/train",
        metavar="DIR",
        help="per-epoch checkpoints, kept outside DVC outputs (default: %(default)s)",
    )
    p.add_argument(
        "--reports",
        default="reports/train",
        metavar="DIR",
        help="metrics.json, history.csv, curves.png (default: %(default)s)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from the checkpoint; fail if there is none")
    mode.add_argument("--fresh", action="store_true", help="ignore any checkpoint and start afresh")
    dist = p.add_argument_group("distributed (torchrun + DistributedDataParallel; gloo on CPU, nccl on CUDA)")
    dist.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="training processes on this node; >1 runs the command under torchrun (default: 1)",
    )
    dist.add_argument(
        "--nnodes",
        type=int,
        default=1,
        metavar="N",
        help="nodes taking part; run the same command on each (default: 1)",
    )
    dist.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="with --nnodes > 1: where the nodes meet")
    p.set_defaults(func=cmd_train)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="calibrate + measure the model (stage), or measure any labelled folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Stage mode (no --data): fit temperature, threshold, band and the OOD threshold on held-out "
        "predictions (the cv stage's out-of-fold ones with --oof, else the val split), measure the "
        "test split with group-bootstrap CIs, write the calibrated model folder and its model card, "
        "log to MLflow and promote to @champion when the promotion rule holds.\n\n"
        "Folder mode (--data DIR --label-map YAML): score a folder of class subfolders with an "
        "existing model and its own calibration; unreadable files are reported and skipped.",
        epilog="examples:\n  cytopipe evaluate --oof reports/cv/oof.csv\n"
        "  cytopipe evaluate --model models:/cytology-classifier@champion --data my_cases/ "
        "--label-map configs/labels/mine.yaml --out reports/my_cases",
    )
    _add_params(p)
    p.add_argument(
        "--model",
        help="stage mode: trained model folder (default: models/train); folder mode: MLflow "
        "URI or model folder (default: models:/cytology-classifier@champion)",
    )
    p.add_argument("--data", metavar="DIR", help="folder mode: labelled folder of class subfolders")
    p.add_argument("--label-map", metavar="YAML", help="folder mode: label map for DIR's classes")
    p.add_argument(
        "--group-regex",
        help="folder mode: regex whose first group is an image's group (default: each image is its own group)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="folder mode: 8-view test-time augmentation (default: as the model was calibrated)",
    )
    p.add_argument("--split", default="data/split/split.csv", help="stage mode: split file (default: %(default)s)")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="stage mode: calibrated model folder (default: models/calibrated); "
        "folder mode: report folder (default: reports/evaluate-folder)",
    )
    p.add_argument(
        "--reports",
        default="reports/evaluate",
        metavar="DIR",
        help="stage mode: metrics and plot files (default: %(default)s)",
    )
    p.add_argument(
        "--oof",
        metavar="CSV",
        help="stage mode: the cv stage's out-of-fold predictions to calibrate "
        "on (needed for a model trained on train+val)",
    )
    p.add_argument(
        "--atypia",
        metavar="JSON",
        help="stage mode: the morphometry stage's atypia.json, shipped with the calibrated model",
    )
    p.add_argument(
        "--atypia-metrics", metavar="JSON", help="stage mode: the morphometry stage's metrics.json, for the card"
    )
    p.set_defaults(func=cmd_evaluate)


def _add_cv(sub) -> None:
    p = sub.add_parser(
        "cv",
        help="grouped k-fold cross-validation over train+val",
        description="Train each CV fold (from the split stage) for cv.epochs and measure it on its "
        "held-out fold; report mean ± sd of AUC and balanced accuracy.",
    )
    _add_params(p)
    p.add_argument("--split", default="data/split/split.csv", help="split file with folds (default: %(default)s)")
    p.add_argument(
        "--reports", default="reports/cv", metavar="DIR", help="metrics.json + folds.csv (default: %(default)s)"
    )
    p.add_argument(
        "--work",
        default="checkpoints/cv",
        metavar="DIR",
        help="per-fold models and checkpoints, resumable (default: %(default)s)",
    )
    p.set_defaults(func=cmd_cv)


def _add_morphometry(sub) -> None:
    p = sub.add_parser(
        "morphometry",
        help="nuclear features of every cell; fit and measure the atypia scores",
        description="Segment the nucleus and cell of every ingested cell, measure the criteria and logistic "
        "atypia scores out of fold and on test (AUC with group-bootstrap CIs), fit the logistic one on the "
        "train split, and draw a contact sheet of the segmentation.",
    )
    _add_params(p)
    p.add_argument("--split", default="data/split/split.csv", help="split file with folds (default: %(default)s)")
    p.add_argument("--oof", metavar="CSV", help="the cv stage's out-of-fold predictions: also measure network + atypia")
    p.add_argument("--out", default="models/atypia", metavar="DIR", help="atypia.json (default: %(default)s)")
    p.add_argument(
        "--reports",
        default="reports/morphometry",
        metavar="DIR",
        help="metrics.json, features.csv, contact_sheet.png (default: %(default)s)",
    )
    p.set_defaults(func=cmd_morphometry)


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export the calibrated model to ONNX and register it",
        description="Export the calibrated model to model.onnx + metadata.json, check on real images "
        "that ONNX Runtime matches torch (export.tolerance), log it to MLflow as an "
        "ONNX-backed pyfunc, register it and move the source version's aliases to it.",
    )
    _add_params(p)
    p.add_argument(
        "--model",
        default="models/calibrated",
        metavar="DIR",
        help="calibrated torch model folder (default: %(default)s)",
    )
    p.add_argument(
        "--split", default="data/split/split.csv", help="split file, for validation images (default: %(default)s)"
    )
    p.add_argument(
        "--out", default="models/exported", metavar="DIR", help="exported model folder (default: %(default)s)"
    )
    p.add_argument("--reports", default="reports/export", metavar="DIR", help="metrics.json (default: %(default)s)")
    p.set_defaults(func=cmd_export)


def _add_predict(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="score image files or folders",
        description="Score images (files, or folders searched recursively for jpg/png/tif/bmp). "
        "Per file: path, calibrated probability of malignant, call (benign / malignant / "
        "indeterminate, from the model's own threshold and band), model version, error. "
        "Unreadable files are reported in their row; the rest are scored.",
    )
    _add_params(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="MLflow URI or model folder, e.g. models/calibrated (default: %(default)s)",
    )
    p.add_argument("--out", metavar="FILE", help="FILE.csv or FILE.json (default: CSV on stdout)")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="8-view test-time augmentation (default: as the model was calibrated)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default: %(default)s)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="batches read and scored at once, each on cores / workers ONNX Runtime threads (default: one per core)",
    )
    p.add_argument(
        "--morphometry",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure each cell's nucleus (N/C ratio, hyperchromasia, shape) and its atypia score "
        "(default: on; --no-morphometry is faster)",
    )
    p.set_defaults(func=cmd_predict)


def _add_score_slide(sub) -> None:
    p = sub.add_parser(
        "score-slide",
        help="score whole slides and write a reviewable report for each",
        description="Detect cells on a whole slide (any format OpenSlide reads, or a plain PNG/JPEG "
        "field image), score each with the calibrated model, and write cells.csv, "
        "summary.json, heatmap.png and a self-contained report.html into --out "
        "(with several slides, into --out/<slide file stem>/). A slide that cannot be "
        "read is reported and skipped; the exit status is 1 if any slide failed.",
    )
    _add_params(p)
    p.add_argument("slides", nargs="+", metavar="SLIDE", help="slide files")
    p.add_argument("--model", default=DEFAULT_MODEL, help="MLflow URI or model folder (default: %(default)s)")
    p.add_argument(
        "--out",
        default="slide-report",
        metavar="DIR",
        help="output folder; with several slides, one subfolder per slide (default: %(default)s)",
    )
    _add_slide_scoring_options(p)
    p.set_defaults(func=cmd_score_slide)


def _add_slide_scoring_options(p) -> None:
    """The scoring options score-slide and score-slides share (read back by `_slide_scoring`)."""
    p.add_argument("--mpp", type=float, help="µm per level-0 pixel, when a slide's properties lack it")
    p.add_argument("--top", type=int, help="cells in each report's gallery (default: slide.gallery in params)")
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="8-view test-time augmentation (default: as the model was calibrated)",
    )
    p.add_argument("--batch-size", type=int, help="cells per inference batch (default: slide.batch_size in params)")


def _add_score_slides(sub) -> None:
    p = sub.add_parser(
        "score-slides",
        help="score a worklist of slides on Dask (resumable) with a cohort report",
        description="Score every slide of WORKLIST (a folder of slides, or a CSV with a `slide` column and "
        "optional `case_id` and `priority`) as one Dask task each, on a local cluster of --workers processes "
        "on 127.0.0.1 or on the cluster at --scheduler. Each slide's report goes to DIR/<slide file stem>/ "
        "as score-slide writes it, plus done.json (slide sha256, model); a slide already scored from the "
        "same bytes by the same model is skipped, a failed one is retried once. DIR/worklist.csv and "
        "DIR/worklist.html list every slide, most suspicious first. Exit status 1 if any slide failed.",
    )
    _add_params(p)
    p.add_argument("worklist", metavar="WORKLIST", help="folder of slides, or CSV slide[,case_id,priority]")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: one report folder per slide")
    p.add_argument("--model", default=DEFAULT_MODEL, help="MLflow URI or model folder (default: %(default)s)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes (default: 1)")
    p.add_argument("--threads", type=int, metavar="N", help="threads per local worker (default: cores / workers)")
    _add_slide_scoring_options(p)
    p.set_defaults(func=cmd_score_slides)


def _add_harvest(sub) -> None:
    p = sub.add_parser(
        "harvest",
        help="cut a slide's labelled cells into a class-folder dataset",
        description="Cut every cell labelled in the report's export (labels.csv) from SLIDE with the "
        "crop recipe scoring uses (slide.crop_margin), into DIR/<label>/<slide id>-<cell "
        "id>.png, and rewrite DIR/manifest.csv (path,class,group + provenance) for ingest. "
        "Harvest several slides into one DIR; a slide harvested again replaces its cells.",
    )
    _add_params(p)
    p.add_argument("slide", metavar="SLIDE", help="the slide that was scored")
    p.add_argument("--cells", required=True, metavar="CSV", help="score-slide's cells.csv for SLIDE")
    p.add_argument(
        "--labels",
        required=True,
        metavar="CSV|GEOJSON",
        help="the report's or the viewer's labels CSV, or a GeoJSON exported from QuPath after review "
        "(.geojson/.json; docs/qupath.md)",
    )
    p.add_argument(
        "--class-map",
        metavar="YAML",
        help="QuPath class name -> label, for a GeoJSON --labels (default: configs/labels/qupath_review.yaml)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder (created, or merged into)")
    p.add_argument("--slide-id", help="id in file names and the group column (default: SLIDE's file stem)")
    p.set_defaults(func=cmd_harvest)


def _add_view(sub) -> None:
    p = sub.add_parser(
        "view",
        help="review a scored slide in the browser (deep zoom, cell overlay, labelling)",
        description="Serve REPORT_DIR (a report folder of score-slide) on 127.0.0.1 only: the slide in "
        "deep zoom with every cell of cells.csv drawn by call, the top cells as a gallery, and labelling "
        "with reviewer initials, saved by the server to REPORT_DIR/labels.csv on every change (the file "
        "`cytopipe harvest --labels` reads). Open the printed address in a browser on this machine.",
    )
    p.add_argument("report_dir", metavar="REPORT_DIR", help="score-slide's output folder (cells.csv, summary.json)")
    p.add_argument("--slide", metavar="SLIDE", help="the slide (default: summary.json's `slide`)")
    p.add_argument("--port", type=int, default=8765, metavar="N", help="port on 127.0.0.1 (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    p.set_defaults(func=cmd_view)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cytopipe", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_ingest(sub)
    _add_split(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_cv(sub)
    _add_morphometry(sub)
    _add_export(sub)
    _add_predict(sub)
    _add_score_slide(sub)
    _add_score_slides(sub)
    _add_harvest(sub)
    _add_view(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"cytopipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except CytopipeError as exc:  # every error written for the user, in one line
        print(f"cytopipe {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
