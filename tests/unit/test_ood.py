"""The domain-shift (OOD) guard's math (pipeline/ood.py) on synthetic features; the guard fitted on a
tiny trained model: tests/integration/test_ood.py."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import ood


# ---------------------------------------------------------------- pure math


def _blobs(rng, n, dim=16, shift=0.0):
    """Two classes of Gaussian features; `shift` moves them along axes neither class uses."""
    y = rng.integers(0, 2, n)
    # A common positive offset, like pooled activations: cosine distances are then meaningful.
    x = rng.standard_normal((n, dim)) + 3.0 * y[:, None] * np.eye(dim)[0] + 4.0
    x[:, dim // 2 : dim // 2 + 4] += shift
    return x, y


@pytest.mark.parametrize(
    "method,options", [("mahalanobis", {}), ("mahalanobis", {"pca_dim": 4}), ("knn", {"k": 3}), ("energy", {})]
)
def test_threshold_lets_pass_rate_of_val_through(method, options):
    rng = np.random.default_rng(0)
    x, y = _blobs(rng, 300)
    xv, _ = _blobs(rng, 101)
    logits = np.c_[xv[:, 0], -xv[:, 0]]
    params = ood.fit(x, y, method, **options)
    params = ood.set_threshold(params, ood.score(params, xv, logits), 0.95)
    passed = ood.in_domain(params, ood.score(params, xv, logits))
    assert passed.mean() >= 0.95 and passed.mean() < 1.0
    assert float(params["val_pass_rate"]) == pytest.approx(passed.mean())
    assert ood.summary(params)["method"] == method and ood.summary(params)["pass_rate"] == 0.95


@pytest.mark.parametrize("method", ["mahalanobis", "knn"])
def test_feature_scores_are_higher_for_shifted_features(method):
    rng = np.random.default_rng(1)
    x, y = _blobs(rng, 400)
    xin, _ = _blobs(rng, 200)
    xout, _ = _blobs(rng, 200, shift=10.0)
    params = ood.fit(x, y, method, k=5)
    s_in, s_out = ood.score(params, xin), ood.score(params, xout)
    assert np.median(s_out) > np.quantile(s_in, 0.99)
    params = ood.set_threshold(params, s_in, 0.95)
    assert (~ood.in_domain(params, s_out)).mean() > 0.95


def test_mahalanobis_handles_fewer_cells_than_dimensions():
    rng = np.random.default_rng(2)
    x, y = _blobs(rng, 20, dim=64)  # singular covariance without shrinkage
    params = ood.fit(x, y, "mahalanobis", shrinkage=0.1)
    s = ood.score(params, np.r_[x[:5], x[:5] + 10])
    assert np.isfinite(s).all() and s[5:].min() > s[:5].max()


def test_normalised_mahalanobis_flags_collapsed_features():
    # A flat image's pooled features are near zero: plain Mahalanobis finds that close to the
    # class means (the mean's direction has large variance), Mahalanobis++ does not.
    rng = np.random.default_rng(5)
    x, y = _blobs(rng, 400)
    x *= rng.uniform(0.5, 1.5, (len(x), 1))  # feature norms vary from cell to cell
    xv, _ = _blobs(rng, 200)
    zero = np.full((3, x.shape[1]), 0.01) + rng.standard_normal((3, x.shape[1])) * 0.01
    plain = ood.set_threshold(ood.fit(x, y), ood.score(ood.fit(x, y), xv), 0.95)
    normed = ood.fit(x, y, normalize=True)
    normed = ood.set_threshold(normed, ood.score(normed, xv), 0.95)
    assert ood.in_domain(plain, ood.score(plain, zero)).all()
    assert not ood.in_domain(normed, ood.score(normed, zero)).any()


def test_energy_is_higher_for_flat_logits():
    params = ood.fit(None, None, "energy")
    s = ood.score(params, logits=np.array([[8.0, -8.0], [0.1, 0.0]]))
    assert s[1] > s[0]


def test_bad_inputs_are_one_line_errors():
    rng = np.random.default_rng(3)
    x, y = _blobs(rng, 30)
    with pytest.raises(ood.OodError, match="ood.method"):
        ood.fit(x, y, "isolation-forest")
    with pytest.raises(ood.OodError, match="non-finite"):
        ood.fit(np.full((3, 2), np.nan), [0, 1, 0])
    params = ood.fit(x, y, "mahalanobis")
    with pytest.raises(ood.OodError, match="dimension 16"):
        ood.score(params, np.zeros((2, 8)))
    with pytest.raises(ood.OodError, match="ood.k"):
        ood.fit(x, y, "knn", k=31)


def _mahalanobis_reference(params: dict, features) -> np.ndarray:
    """The Mahalanobis score in float64, as pipeline/ood.py once computed it: min over class means mu of
    sqrt((z - mu) P (z - mu)) with z = (x - center) @ basis."""
    x = np.asarray(features, dtype=np.float64)
    if "normalize" in params and bool(params["normalize"]):
        x = ood._l2_normalise(x)
    z = (x - params["center"]) @ params["basis"].astype(np.float64)
    prec = params["precision"].astype(np.float64)
    d = np.stack([((z - mu) @ prec * (z - mu)).sum(axis=1) for mu in params["means"].astype(np.float64)])
    return np.sqrt(np.maximum(d.min(axis=0), 0.0))


@pytest.mark.parametrize("options", [{}, {"normalize": True}, {"pca_dim": 8}])
def test_fast_mahalanobis_equals_its_definition(options, tmp_path):
    """The one-matrix-product score equals the float64 formula, and its cached whitening is never saved."""
    rng = np.random.default_rng(5)
    x, y = _blobs(rng, 40, dim=48)  # fewer cells than dimensions, as with 613 cells and 1280-d features
    params = ood.set_threshold(ood.fit(x, y, "mahalanobis", **options), rng.random(10), 0.9)
    query = np.concatenate([x[:5], _blobs(rng, 20, dim=48, shift=5.0)[0]])
    np.testing.assert_allclose(ood.score(params, query), _mahalanobis_reference(params, query), rtol=1e-4)
    assert "_whitening" in params  # cached by the first score
    ood.save(tmp_path / ood.OOD_FILE, params)
    back = ood.load(tmp_path / ood.OOD_FILE)
    assert not any(k.startswith("_") for k in back)
    np.testing.assert_allclose(ood.score(back, query), ood.score(params, query), rtol=1e-6)


def _blas_limits() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_one_blas_thread_from_overlapping_workers_restores_the_limit():
    """Workers that enter the context in one order and leave in another, alone or inside one context of
    the main thread (as predict and score-slide do), leave the original limit at the end; inside the
    main thread's context BLAS stays on one thread throughout. (With threadpoolctl's own contexts in
    the workers, the first case ends with the limit stuck at 1.)"""
    import threading

    before = _blas_limits()
    if not before:
        pytest.skip("numpy has no BLAS threadpool here")  # numpy built without a BLAS library

    def overlapping_workers() -> list[list[int]]:
        entered, release, inside = threading.Barrier(2), threading.Event(), []

        def worker(leave_first: bool):
            with ood.one_blas_thread():
                entered.wait()
                if not leave_first:
                    release.wait(5)
                inside.append(_blas_limits())
            if leave_first:
                release.set()

        threads = [threading.Thread(target=worker, args=(flag,)) for flag in (True, False)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return inside

    assert len(overlapping_workers()) == 2 and _blas_limits() == before
    with ood.one_blas_thread():
        inside = overlapping_workers()
        assert _blas_limits() == [1] * len(before)
    assert inside == [[1] * len(before)] * 2 and _blas_limits() == before


def test_npz_round_trip_and_no_pickle(tmp_path):
    rng = np.random.default_rng(4)
    x, y = _blobs(rng, 50)
    params = ood.set_threshold(ood.fit(x, y, "knn", k=2), rng.random(20), 0.9)
    ood.save(tmp_path / ood.OOD_FILE, params)
    back = ood.load(tmp_path / ood.OOD_FILE)
    np.testing.assert_array_equal(ood.score(back, x[:7]), ood.score(params, x[:7]))
    assert ood.summary(back) == ood.summary(params)
    np.savez(tmp_path / "evil.npz", method=np.array(["knn", {"x": 1}], dtype=object), threshold=np.array(1.0))
    with pytest.raises(ood.OodError, match="evil.npz"):
        ood.load(tmp_path / "evil.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ood.OodError, match="junk.npz: not a readable"):
        ood.load(tmp_path / "junk.npz")


def test_guard_calls_replace_every_out_of_domain_call():
    calls = ood.guard_calls(
        np.array(["benign", "malignant", "indeterminate", "malignant"]), np.array([True, False, False, True])
    )
    assert list(calls) == ["benign", ood.OUT_OF_DOMAIN, ood.OUT_OF_DOMAIN, "malignant"]
