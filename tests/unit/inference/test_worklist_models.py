"""The per-worker model cache of `cytopipe score-slides`: loaded once, loaded again when the folder changes."""

from __future__ import annotations

import os

from pipeline.config import SlideConfig
from pipeline.inference import worklist
from pipeline.inference.worklist import Job, model_stamp, worker_model


def test_a_model_folder_retrained_in_place_is_loaded_again(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "metadata.json").write_text("{}")
    loads = []
    monkeypatch.setattr(worklist, "_MODELS", {})
    monkeypatch.setattr(worklist, "load_model", lambda model, cfg, uri: loads.append(model) or f"loaded {len(loads)}")
    job, cfg = Job(str(folder), str(tmp_path / "out"), SlideConfig()), SlideConfig()
    assert worker_model(job, cfg) == worker_model(job, cfg) == "loaded 1"  # once per worker process
    stat = (folder / "metadata.json").stat()
    os.utime(folder / "metadata.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # retrained in place
    assert worker_model(job, cfg) == "loaded 2" and len(worklist._MODELS) == 1  # the old state is dropped


def test_an_mlflow_uri_has_no_stamp_and_a_folder_has_its_files_times(tmp_path):
    assert model_stamp("models:/cytopipe/3") == ()
    (tmp_path / "model.json").write_text("{}")
    assert model_stamp(str(tmp_path)) == ((tmp_path / "model.json").stat().st_mtime_ns, None)


def test_done_json_tells_a_folder_retrained_under_the_same_version_apart(tmp_path):
    from types import SimpleNamespace

    from pipeline.inference.worklist import model_key

    folder = tmp_path / "calibrated"
    folder.mkdir()
    (folder / "model.json").write_text('{"threshold": 0.40}')
    loaded = SimpleNamespace(uri=str(folder), version="unregistered", predictor=SimpleNamespace(model_dir=folder))
    before = model_key(loaded)
    (folder / "model.json").write_text('{"threshold": 0.35}')  # recalibrated in place, still unregistered
    after = model_key(loaded)
    assert before["version"] == after["version"] and before["uri"] == after["uri"]
    assert before != after and len(after["card_sha256"]) == 64
