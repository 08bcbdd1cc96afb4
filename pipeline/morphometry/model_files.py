"""Morphometry inside a model folder: the fitted atypia model travels with the network's weights (listed
with its sha256 like them) and the card records the settings it was measured with, so predict,
score-slide and the REST server measure cells exactly as the morphometry stage did."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from pipeline import atomic
from pipeline.config import MorphometryConfig
from pipeline.model_card import ATYPIA_FILE, ModelCard, file_sha256
from pipeline.morphometry.atypia import LogisticAtypia
from pipeline.typed_yaml import load_section, plain


def attach(model_dir: Path, atypia_json: Path, metrics_json: Path | None, cfg: MorphometryConfig) -> ModelCard:
    """Copy the morphometry stage's atypia.json into `model_dir` with its sha256, and record in the card the
    settings, the score that ships and both scores' metrics (the stage's metrics.json, when given)."""
    model_dir = Path(model_dir)
    LogisticAtypia.read(atypia_json)  # refuse a malformed file before it is shipped
    with atomic.atomic_path(model_dir / ATYPIA_FILE) as tmp:
        shutil.copyfile(atypia_json, tmp)
    metrics = json.loads(Path(metrics_json).read_text()) if metrics_json and Path(metrics_json).is_file() else None
    card = ModelCard.read(model_dir)
    card = dataclasses.replace(
        card.with_file(ATYPIA_FILE, file_sha256(model_dir / ATYPIA_FILE)),
        morphometry={"file": ATYPIA_FILE, "settings": plain(cfg), "metrics": metrics},
    )
    card.write(model_dir)
    return card


def copy_into(source_dir: Path, source: ModelCard, out_dir: Path, card: ModelCard) -> ModelCard:
    """`card` for a model made from `source` (an export) with the source's atypia model copied along,
    after checking it against the source's sha256."""
    if not source.morphometry:
        return dataclasses.replace(card, morphometry=None)
    name = source.morphometry.get("file") or ATYPIA_FILE
    shutil.copyfile(source.verify(source_dir, name), Path(out_dir) / name)
    return dataclasses.replace(card.with_file(name, file_sha256(Path(out_dir) / name)), morphometry=source.morphometry)


def settings_of(card: ModelCard) -> MorphometryConfig:
    """The morphometry settings the model's atypia scores were measured with (defaults for an older card)."""
    raw = (card.morphometry or {}).get("settings")
    return load_section(MorphometryConfig, raw, "model card", "morphometry.settings") if raw else MorphometryConfig()


def logistic_of(model_dir: Path, card: ModelCard) -> LogisticAtypia | None:
    """The model's fitted atypia model, checked against the card's sha256; None when it ships none."""
    if not card.morphometry:
        return None
    return LogisticAtypia.read(card.verify(model_dir, card.morphometry.get("file") or ATYPIA_FILE))
