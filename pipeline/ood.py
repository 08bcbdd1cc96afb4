"""Out-of-distribution (domain-shift) guard: numpy only, so the ONNX path stays torch-free.

A model fine-tuned on one specimen type is confidently wrong on another (Herlev cervical cells
-> Pap urine cells: AUC 0.33), so every prediction also gets an OOD score (higher = further from
the training domain). The score is fitted on the TRAINING split's penultimate-layer features
(global-pooled, before the classifier); the threshold is the `pass_rate` quantile of the
VALIDATION scores, so that fraction of in-domain cells passes by construction.

Methods:
- `mahalanobis`: min over classes of the Mahalanobis distance to the class mean, one shared
  covariance with shrinkage towards a scaled identity (train sets are smaller than the feature
  dimension), optionally in a PCA subspace, optionally on L2-normalised features
  ("Mahalanobis++": a flat image's near-zero features otherwise sit close to the class means).
- `knn`: 1 - cosine similarity to the k-th nearest train feature (L2-normalised features).
- `energy`: -logsumexp(logits); needs no features.

Parameters are a flat dict of numpy arrays (strings as 0-d unicode arrays), saved as an .npz
that loads with allow_pickle=False.
"""

from __future__ import annotations

import contextlib
import io
import threading
from pathlib import Path

import numpy as np

from pipeline import atomic
from pipeline.errors import CytopipeError
from pipeline.model_card import OOD_FILE  # noqa: F401 - the file name lives with the card

METHODS = ("mahalanobis", "knn", "energy")
OUT_OF_DOMAIN = "out of domain"  # the call an out-of-domain cell gets instead of benign/malignant


class OodError(CytopipeError, ValueError):
    """Bad OOD inputs or an unusable ood.npz. One line."""


def _as_2d(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] == 0:
        raise OodError(f"{name} must have shape (N, D) with N >= 1, got {a.shape}")
    if not np.isfinite(a).all():
        raise OodError(f"{name} holds non-finite values")
    return a


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_configured(features, labels, cfg) -> dict:
    """`fit` with the settings of an OodConfig (params.yaml `ood`); k is capped at the number of cells.

    The one place the cv stage (a guard per fold) and the evaluate stage (the shipped guard) fit a guard,
    so the out-of-fold OOD scores come from the same kind of guard as the one that ships."""
    n = len(np.asarray(labels).ravel())
    return fit(
        features,
        labels,
        cfg.method,
        k=min(cfg.k, n),
        shrinkage=cfg.shrinkage,
        pca_dim=cfg.pca_dim,
        normalize=cfg.normalize,
    )


def fit(
    features,
    labels,
    method: str = "mahalanobis",
    *,
    k: int = 5,
    shrinkage: float = 0.1,
    pca_dim: int = 0,
    normalize: bool = False,
    logits=None,
) -> dict:
    """OOD parameters from training features (N, D) and integer labels (N,).

    `logits` is unused by every method (energy needs nothing fitted); it is accepted so that
    callers can pass what they have. The threshold is set later by `set_threshold`."""
    if method not in METHODS:
        raise OodError(f"ood.method: '{method}' is not one of {', '.join(METHODS)}")
    params: dict[str, np.ndarray] = {"method": np.array(method), "threshold": np.array(np.inf)}
    if method == "energy":
        return params
    x = _as_2d(features, "train features")
    params["feature_dim"] = np.array(x.shape[1])
    if method == "knn":
        if not 1 <= k <= len(x):
            raise OodError(f"ood.k: must be in [1, {len(x)}] (the number of train cells), got {k}")
        params["bank"] = _l2_normalise(x).astype(np.float32)
        params["k"] = np.array(int(k))
        return params
    y = np.asarray(labels).astype(int).ravel()
    if len(y) != len(x):
        raise OodError(f"train features and labels differ in length: {len(x)} vs {len(y)}")
    if not 0 <= shrinkage <= 1:
        raise OodError(f"ood.shrinkage: must be in [0, 1], got {shrinkage}")
    if normalize:  # Mahalanobis++: on L2-normalised features, so near-zero features (flat images) are far
        x = _l2_normalise(x)
    center = x.mean(axis=0)
    basis = np.eye(x.shape[1])
    if 0 < pca_dim < x.shape[1]:  # principal axes of the train features
        _, _, vt = np.linalg.svd(x - center, full_matrices=False)
        basis = vt[:pca_dim].T
    z = (x - center) @ basis
    classes = np.unique(y)
    means = np.stack([z[y == c].mean(axis=0) for c in classes])
    resid = z - means[np.searchsorted(classes, y)]
    cov = resid.T @ resid / max(len(z) - len(classes), 1)
    # Shrink towards a scaled identity: with fewer cells than dimensions the covariance is singular.
    target = np.trace(cov) / cov.shape[0] if cov.shape[0] else 1.0
    cov = (1 - shrinkage) * cov + shrinkage * max(target, 1e-12) * np.eye(cov.shape[0])
    params.update(
        center=center.astype(np.float32),
        basis=basis.astype(np.float32),
        means=means.astype(np.float32),
        precision=np.linalg.inv(cov).astype(np.float32),
        shrinkage=np.array(float(shrinkage)),
        pca_dim=np.array(int(pca_dim)),
        normalize=np.array(bool(normalize)),
    )
    return params


def method_of(params: dict) -> str:
    return str(params["method"])


def needs_features(params: dict) -> bool:
    return method_of(params) != "energy"


def score(params: dict, features=None, logits=None) -> np.ndarray:
    """OOD score per row: higher = further from the training domain."""
    method = method_of(params)
    if method == "energy":
        if logits is None:
            raise OodError("energy OOD score needs logits")
        z = np.asarray(logits, dtype=np.float64)
        m = z.max(axis=1, keepdims=True)
        return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))
    if features is None:
        raise OodError(f"{method} OOD score needs features")
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != int(params["feature_dim"]):
        raise OodError(
            f"features have shape {x.shape}; the OOD guard was fitted on dimension {int(params['feature_dim'])}"
        )
    if len(x) == 0:
        return np.zeros(0)
    if method == "knn":
        with one_blas_thread():
            sims = _l2_normalise(x) @ params["bank"].astype(np.float64).T
        k = int(params["k"])
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]  # k-th largest similarity
        return 1.0 - kth
    if "normalize" in params and bool(params["normalize"]):
        x = _l2_normalise(x)
    weights, offsets = _whitening(params)
    # One float32 matrix product per batch: on 1280-d features the float64 form (basis, precision and a
    # product per class, re-cast every call) cost 0.9 ms per cell, a third of a 128 px int8 forward pass.
    with one_blas_thread():
        w = (x - params["center"]).astype(np.float32) @ weights
    d = ((w[None, :, :] - offsets[:, None, :]) ** 2).sum(axis=2, dtype=np.float64)
    return np.sqrt(np.maximum(d.min(axis=0), 0.0))


_BLAS = None


def one_blas_thread():
    """A context in which numpy's BLAS runs in the calling thread only (main thread; elsewhere a no-op).

    OpenBLAS's worker threads busy-wait after each product; beside ONNX Runtime on 2 cores they took a
    core from the next batch's forward pass (model 819 -> 592 cells/s, measured in one run). The product
    itself is ~1.5 ms per batch of 32 on one thread. OpenBLAS has one process-wide limit, and
    threadpoolctl lets only the first thread that sets it change it back: contexts of worker threads
    that overlap can leave the limit at 1 for good (a test shows it). So only the main thread sets it;
    code that scores from worker threads enters this once around them all (predict and score-slide do)."""
    global _BLAS
    if threading.current_thread() is not threading.main_thread():
        return contextlib.nullcontext()
    if _BLAS is None:
        from threadpoolctl import ThreadpoolController

        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _whitening(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """(W, offsets): with P = L L^T, the distance to class mean mu is ||(x - center) W - o_mu||, where
    W = basis @ L and o_mu = mu @ L. Computed once per guard and cached in `params`
    under a private key (never saved: to_bytes skips keys that start with '_')."""
    cached = params.get("_whitening")
    if cached is None:
        prec = params["precision"].astype(np.float64)
        prec = (prec + prec.T) / 2  # stored in float32: symmetrise before factorising
        try:
            chol = np.linalg.cholesky(prec)
        except np.linalg.LinAlgError:  # not positive definite after rounding: a symmetric square root
            vals, vecs = np.linalg.eigh(prec)
            chol = vecs * np.sqrt(np.clip(vals, 0.0, None))
        weights = params["basis"].astype(np.float64) @ chol
        offsets = params["means"].astype(np.float64) @ chol
        cached = (weights.astype(np.float32), offsets.astype(np.float32))
        params["_whitening"] = cached
    return cached


def set_threshold(params: dict, val_scores, pass_rate: float) -> dict:
    """A copy of params whose threshold lets `pass_rate` of the validation scores through."""
    s = np.asarray(val_scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if not 0 < pass_rate <= 1:
        raise OodError(f"ood.pass_rate: must be in (0, 1], got {pass_rate}")
    if not len(s):
        raise OodError("no finite validation OOD scores to set the threshold on")
    # 'higher' quantile: the threshold is an observed score, so >= pass_rate of val passes.
    threshold = float(np.quantile(s, pass_rate, method="higher"))
    return {
        **params,
        "threshold": np.array(threshold),
        "pass_rate": np.array(float(pass_rate)),
        "val_pass_rate": np.array(float((s <= threshold).mean())),
    }


def in_domain(params: dict | None, scores) -> np.ndarray:
    """True where a score passes the threshold; no guard (None) or a NaN score counts as in domain."""
    s = np.asarray(scores, dtype=np.float64)
    if params is None:
        return np.ones(s.shape, dtype=bool)
    return ~(s > float(params["threshold"]))


def summary(params: dict) -> dict:
    """The JSON-able description stored in model.json / metadata.json and MLflow."""
    out = {
        "method": method_of(params),
        "threshold": float(params["threshold"]),
        "pass_rate": float(params["pass_rate"]) if "pass_rate" in params else None,
        "val_pass_rate": float(params["val_pass_rate"]) if "val_pass_rate" in params else None,
        "feature_dim": int(params["feature_dim"]) if "feature_dim" in params else None,
    }
    for key in ("k", "shrinkage", "pca_dim", "normalize"):
        if key in params:
            out[key] = params[key].item()
    return out


def to_bytes(params: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in params.items() if not k.startswith("_")})
    return buf.getvalue()


def save(path: Path | str, params: dict) -> None:
    """Write ood.npz atomically."""

    with atomic.atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(to_bytes(params))


def load(path: Path | str) -> dict:
    """Parameters from an ood.npz; never unpickles (object arrays are refused)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            params = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise OodError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as exc:  # not an npz, truncated, or object arrays
        raise OodError(f"{path}: not a readable OOD parameter file ({str(exc).splitlines()[0][:120]})") from None
    if "method" not in params or str(params["method"]) not in METHODS or "threshold" not in params:
        raise OodError(f"{path}: not an OOD parameter file (method/threshold missing)")
    return params


def guard_calls(calls, in_domain_mask) -> np.ndarray:
    """Calls with every out-of-domain cell's call replaced by OUT_OF_DOMAIN: a cell outside the
    training domain is never called benign, malignant or indeterminate."""
    calls = np.asarray(calls).astype(object)
    calls[~np.asarray(in_domain_mask, dtype=bool)] = OUT_OF_DOMAIN
    return calls.astype(str)
