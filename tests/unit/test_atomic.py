"""Staged writes (pipeline/atomic.py): a report folder written half way is never left behind."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "existing folder"])
def test_a_report_that_fails_half_way_leaves_nothing(tmp_path, existing):
    from pipeline import atomic

    out = tmp_path / "report"
    if existing:
        out.mkdir()
        (out / "cells.csv").write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic.staged_dir(out) as staging:
            (staging / "cells.csv").write_text("new\n")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == (["report"] if existing else [])
    assert (
        not existing or [p.name for p in out.iterdir()] == ["cells.csv"] and (out / "cells.csv").read_text() == "old\n"
    )
