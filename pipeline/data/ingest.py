"""Ingest stage: a folder of class subfolders (or a CSV manifest) -> validated manifest + rejects.

Every file is hashed and decoded once. Files that cannot be used are reported with a
reason and left out; exact duplicates are resolved so that no split can leak them.
"""

from __future__ import annotations

import csv
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import atomic
from pipeline.config import EXCLUDE, ConfigError, DataSource, GroupRule, LabelMap
from pipeline.data.images import IMAGE_SUFFIXES, ImageError, ImageLimits, decode_rgb, read_bytes, sha256_bytes
from pipeline.data.manifest import MANIFEST_COLUMNS, REJECT_COLUMNS, read_table, source_root
from pipeline.errors import CytopipeError


class IngestError(CytopipeError, RuntimeError):
    """The stage cannot produce a manifest (bad source, or no usable image at all)."""


@dataclass(frozen=True)
class Candidate:
    path: Path  # as found (absolute or relative to the working directory)
    rel: str  # posix path relative to the source root
    original_class: str
    group: str | None = None  # from a manifest column, when the rule says so


@dataclass
class IngestResult:
    rows: list[dict] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        by_label: dict[str, int] = defaultdict(int)
        by_class: dict[str, int] = defaultdict(int)
        for row in self.rows:
            by_label[row["label"]] += 1
            by_class[row["original_class"]] += 1
        return {
            "n_files": len(self.rows) + len(self.rejects),
            "n_accepted": len(self.rows),
            "n_rejected": len(self.rejects),
            "n_groups": len({row["group"] for row in self.rows}),
            "n_converted_to_rgb": sum(row["mode"] != "RGB" for row in self.rows),
            "labels": dict(sorted(by_label.items())),
            "classes": dict(sorted(by_class.items())),
        }


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _walk_class_folder(folder: Path, root: Path, cls: str, rejects: list[dict]) -> list[Candidate]:
    found = []
    n_rejects = len(rejects)

    def unlistable(exc: OSError) -> None:
        # os.walk would otherwise skip an unreadable folder, and its images, without a word.
        rejects.append(
            {
                "path": _rel(Path(exc.filename), root),
                "original_class": cls,
                "reason": f"cannot list folder: {exc.strerror or exc}",
            }
        )

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlistable):
        here = Path(dirpath)
        for name in sorted(dirnames):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                # A directory that looks like an image would otherwise vanish silently.
                rejects.append(
                    {
                        "path": _rel(here / name, root),
                        "original_class": cls,
                        "reason": "is a directory, not an image file",
                    }
                )
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and Path(d).suffix.lower() not in IMAGE_SUFFIXES
        )
        for name in sorted(filenames):
            if not name.startswith("."):
                found.append(Candidate(here / name, _rel(here / name, root), cls))
    if not found and len(rejects) == n_rejects:
        rejects.append({"path": _rel(folder, root), "original_class": cls, "reason": "empty class folder (no files)"})
    return found


def discover_folder(source: Path, rejects: list[dict]) -> list[Candidate]:
    """Each non-hidden subfolder of `source` is a class; its files (recursively) are candidates."""
    if not source.is_dir():
        raise IngestError(f"{source}: not a folder")
    try:
        classes = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise IngestError(f"{source}: cannot list folder: {exc.strerror or exc}") from None
    if not classes:
        raise IngestError(f"{source}: no class subfolders found (expected <source>/<class>/<image>)")
    candidates = []
    for folder in classes:
        candidates += _walk_class_folder(folder, source, folder.name, rejects)
    return candidates


GROUP_COLUMN = "group"  # harvest writes it; a CSV manifest with it is grouped by it unless a rule says otherwise


def _csv_columns(source: Path) -> list[str]:
    try:
        with open(source, newline="", encoding="utf-8-sig") as fh:
            return csv.DictReader(fh).fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"{source}: cannot read CSV manifest ({exc})") from None


def effective_group_rule(source: Path | str, group_rule: GroupRule | None) -> GroupRule:
    """`group_rule`; without one (None), a CSV manifest's `group` column when it has one, else the
    default file-name rule. Why: a harvested manifest's groups are slides, which no file name says."""
    if group_rule is not None:
        return group_rule
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".csv" and GROUP_COLUMN in _csv_columns(source):
        return GroupRule(regex=None, column=GROUP_COLUMN)
    return GroupRule()


def discover_csv(source: Path, group_rule: GroupRule) -> list[Candidate]:
    """Rows of a CSV with columns path, class[, group]; paths relative to the CSV's folder."""
    root = source.parent
    try:
        with open(source, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            needed = ["path", "class"] + ([group_rule.column] if group_rule.column else [])
            missing = [c for c in needed if c not in columns]
            if missing:
                raise IngestError(f"{source}: missing column(s) {', '.join(missing)} (has: {', '.join(columns)})")
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"{source}: cannot read CSV manifest ({exc})") from None
    candidates = []
    for line, row in enumerate(rows, start=2):
        if not row["path"] or not row["class"]:
            raise IngestError(f"{source}: line {line}: empty path or class")
        path = Path(row["path"])
        path = path if path.is_absolute() else root / path
        group = row[group_rule.column] if group_rule.column else None
        candidates.append(Candidate(path, _rel(path, root), row["class"], group or None))
    return candidates


def discover(source: Path | str, group_rule: GroupRule, rejects: list[dict]) -> list[Candidate]:
    source = Path(source)
    if not source.exists():
        raise IngestError(f"{source}: not found (set data.sources in params.yaml or pass --source)")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise IngestError(f"{source}: a source must be a folder of class subfolders or a .csv manifest")
        return discover_csv(source, group_rule)
    if group_rule.column:
        raise ConfigError(f"group.column '{group_rule.column}' needs a CSV manifest source; {source} is a folder")
    return discover_folder(source, rejects)


class _Groups:
    """Union-find over group names, so duplicates can glue their groups together."""

    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, g: str) -> str:
        self.parent.setdefault(g, g)
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def names(self) -> dict[str, str]:
        """Root -> a readable merged name such as 'a+b'."""
        members: dict[str, list[str]] = defaultdict(list)
        for g in list(self.parent):
            members[self.find(g)].append(g)
        return {root: "+".join(sorted(gs)) for root, gs in members.items()}


def resolve_duplicates(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drop exact duplicates (same sha256).

    Under different labels all copies are excluded; under one label the first path is
    kept and the groups of all copies are merged, so no split can separate them.
    """
    by_hash: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_hash[row["sha256"]].append(row)
    groups = _Groups()
    for row in rows:
        groups.find(row["group"])
    kept, rejects = [], []
    for copies in by_hash.values():
        if len(copies) == 1:
            kept.append(copies[0])
            continue
        copies = sorted(copies, key=lambda r: r["path"])
        if len({r["label"] for r in copies}) > 1:
            listing = "; ".join(f"{r['path']} ({r['label']})" for r in copies)
            for r in copies:
                rejects.append(
                    {
                        "path": r["path"],
                        "original_class": r["original_class"],
                        "reason": f"exact duplicate with conflicting labels: {listing}",
                    }
                )
            continue
        first = copies[0]
        for r in copies[1:]:
            groups.union(first["group"], r["group"])
            rejects.append(
                {
                    "path": r["path"],
                    "original_class": r["original_class"],
                    "reason": f"exact duplicate of {first['path']} (same label); groups merged",
                }
            )
        kept.append(first)
    names = groups.names()
    for row in kept:
        row["group"] = names[groups.find(row["group"])]
    return sorted(kept, key=lambda r: r["path"]), rejects


def _check_classes(candidates: list[Candidate], label_map: LabelMap) -> None:
    missing = sorted({c.original_class for c in candidates} - set(label_map.classes))
    if missing:
        raise ConfigError(label_map.missing_message(missing))


def ingest(
    source: Path | str,
    label_map: LabelMap,
    group_rule: GroupRule | None,
    limits: ImageLimits = ImageLimits(),
    progress: bool | None = None,
) -> IngestResult:
    """Validate every image under `source`; return manifest rows and rejects (pure: writes nothing).
    `group_rule` None: see `effective_group_rule`."""
    from tqdm import tqdm

    result = IngestResult()
    group_rule = effective_group_rule(source, group_rule)
    candidates = discover(source, group_rule, result.rejects)
    _check_classes(candidates, label_map)
    rows = []
    # progress=None: a bar on a TTY only.
    for cand in tqdm(
        candidates, desc="ingest", unit="img", disable=None if progress is None else not progress, file=sys.stderr
    ):
        label = label_map.classes[cand.original_class]
        if label == EXCLUDE:
            result.rejects.append(
                {
                    "path": cand.rel,
                    "original_class": cand.original_class,
                    "reason": f"class '{cand.original_class}' is marked '{EXCLUDE}' in the label map",
                }
            )
            continue
        try:
            data = read_bytes(cand.path)
            _, info = decode_rgb(data, cand.path, limits)
        except ImageError as exc:
            result.rejects.append({"path": cand.rel, "original_class": cand.original_class, "reason": exc.reason})
            continue
        group = cand.group if group_rule.column else group_rule.group_of(cand.path.name)
        if not group:
            why = (
                f"empty '{group_rule.column}' column"
                if group_rule.column
                else f"file name does not match group regex {group_rule.regex!r}"
            )
            result.rejects.append(
                {"path": cand.rel, "original_class": cand.original_class, "reason": f"no group: {why}"}
            )
            continue
        rows.append(
            {
                "path": cand.rel,
                "sha256": sha256_bytes(data),
                "width": info.width,
                "height": info.height,
                "mode": info.mode,
                "original_class": cand.original_class,
                "label": label,
                "group": group,
            }
        )
    result.rows, dup_rejects = resolve_duplicates(rows)
    result.rejects += dup_rejects
    result.rejects.sort(key=lambda r: r["path"])
    return result


def write_outputs(
    result: IngestResult,
    out_dir: Path | str,
    source: str,
    label_map: LabelMap,
    root: str | None = None,
    sources: dict | None = None,
) -> dict:
    """Write manifest.csv, rejects.csv and summary.json into `out_dir`, atomically."""
    import pandas as pd

    out_dir = Path(out_dir)
    # Several sources: each row also names its source.
    extra = (SOURCE_COLUMN,) if any(SOURCE_COLUMN in r for r in result.rows[:1] + result.rejects[:1]) else ()
    if result.rows:  # never leave an empty manifest for the next stage to trip over
        atomic.write_csv(out_dir / "manifest.csv", pd.DataFrame(result.rows, columns=list(MANIFEST_COLUMNS + extra)))
    else:
        (out_dir / "manifest.csv").unlink(missing_ok=True)
    atomic.write_csv(out_dir / "rejects.csv", pd.DataFrame(result.rejects, columns=list(REJECT_COLUMNS + extra)))
    summary = {
        "source": source,
        "root": root or source_root(source).as_posix(),
        "label_map": label_map.path,
        **({"sources": sources} if sources else {}),
        **result.summary(),
    }
    atomic.write_json(out_dir / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------- several sources

SOURCE_COLUMN = "source"  # the merged manifest of several sources names each row's source


def check_label_maps(sources: tuple[DataSource, ...]) -> LabelMap:
    """Every source's label map must give the model the same labels in the same order; returns the first."""
    maps = [LabelMap.load(s.label_map) for s in sources]
    for s, lm in zip(sources[1:], maps[1:]):
        if lm.labels != maps[0].labels:
            raise ConfigError(
                f"{s.label_map}: labels {list(lm.labels)} differ from {maps[0].path}'s "
                f"{list(maps[0].labels)}; every source must give the model the same labels"
            )
    return maps[0]


def merge_sources(parts: list[tuple[DataSource, IngestResult]]) -> IngestResult:
    """One manifest from per-source results. With several sources, paths are joined to each source's
    root (so they resolve from the project folder), groups get a '<source>:' prefix so two sources'
    groups never collide, and a `source` column is added; duplicates are resolved across sources."""
    if len(parts) == 1:
        return parts[0][1]
    rows, rejects = [], []
    for src, part in parts:
        root = source_root(src.path)
        rebase = lambda rel: (root / rel).as_posix()  # noqa: E731  (an absolute rel stays absolute)
        rows += [
            {**r, "path": rebase(r["path"]), "group": f"{src.name}:{r['group']}", SOURCE_COLUMN: src.name}
            for r in part.rows
        ]
        rejects += [{**r, "path": rebase(r["path"]), SOURCE_COLUMN: src.name} for r in part.rejects]
    merged = IngestResult()
    merged.rows, dup_rejects = resolve_duplicates(rows)
    merged.rejects = sorted(rejects + dup_rejects, key=lambda r: r["path"])
    return merged


def ingest_source(src: DataSource, limits: ImageLimits = ImageLimits(), progress: bool | None = None) -> IngestResult:
    """One source on its own: paths relative to it, its own label map and group rule."""
    return ingest(src.path, LabelMap.load(src.label_map), src.group, limits, progress)


def ingest_sources(
    sources: tuple[DataSource, ...], limits: ImageLimits = ImageLimits(), progress: bool | None = None
) -> IngestResult:
    """Every source, merged (pure: writes nothing)."""
    check_label_maps(sources)
    return merge_sources([(s, ingest_source(s, limits, progress)) for s in sources])


def read_source_outputs(src: DataSource, folder: Path | str) -> IngestResult:
    """A per-source ingest's outputs (`run_source`) back as an IngestResult."""
    folder = Path(folder)
    rows = read_table(folder / "manifest.csv", MANIFEST_COLUMNS).to_dict("records")
    rejects = read_table(folder / "rejects.csv", REJECT_COLUMNS).to_dict("records")
    return IngestResult(rows, rejects)


def _report(result: IngestResult, summary: dict, what: str, out_dir: str) -> None:
    for rej in result.rejects:
        print(f"rejected: {rej['path']}: {rej['reason']}", file=sys.stderr)
    if not result.rows:
        raise IngestError(
            f"{what}: no usable images ({len(result.rejects)} rejected; see {Path(out_dir) / 'rejects.csv'})"
        )
    labels = ", ".join(f"{n} {label}" for label, n in summary["labels"].items())
    print(
        f"ingest: {summary['n_accepted']} images accepted ({labels}), {summary['n_rejected']} rejected, "
        f"{summary['n_groups']} groups -> {Path(out_dir) / 'manifest.csv'}"
    )


def run_sources(
    sources: tuple[DataSource, ...], limits: ImageLimits, out_dir: str, merge_from: str | None = None
) -> dict:
    """The stage over several sources: ingest each (or, with `merge_from`, read each one's outputs
    from merge_from/<name>/, as the per-source DVC stages wrote them), merge, write, report."""
    label_map = check_label_maps(sources)
    parts = [
        (s, read_source_outputs(s, Path(merge_from) / s.name) if merge_from else ingest_source(s, limits))
        for s in sources
    ]
    result = merge_sources(parts)
    summary = write_outputs(
        result,
        out_dir,
        ", ".join(s.path for s in sources),
        label_map,
        root="." if len(sources) > 1 else None,
        sources={
            s.name: {"path": s.path, "label_map": s.label_map, "n_accepted": len(p.rows), "n_rejected": len(p.rejects)}
            for s, p in parts
        },
    )
    _report(result, summary, " + ".join(s.name for s in sources), out_dir)
    return summary


def run(source: str, label_map_path: str, group_rule: GroupRule | None, limits: ImageLimits, out_dir: str) -> dict:
    """The stage: ingest, write outputs, and fail if no image is usable."""
    label_map = LabelMap.load(label_map_path)
    result = ingest(source, label_map, group_rule, limits)
    summary = write_outputs(result, out_dir, source, label_map)
    _report(result, summary, source, out_dir)
    return summary
