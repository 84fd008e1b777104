"""GP-NAS style predictors: a linear mean plus a Gaussian process on its residuals.

`GPPredictor` is a scikit-learn estimator on plain numeric arrays (rows from
`SearchSpace.encode`): features are standardised, a Bayesian ridge regression fits the linear
trend, and a `GaussianProcessRegressor` with a learned ARD kernel
(`ConstantKernel * Matern(nu) + WhiteKernel`, hyperparameters by marginal likelihood with seeded
restarts) models what the trend misses. Unlike PaddleSlim's GP-NAS the kernel's length scales are
learned, not fixed. Latency targets can be fitted in log space (`log_target=True`), where
relative errors are what count, and metrics bounded in (0, 1) (accuracy, mAP, recall) in logit space
(`logit_target=True`), where a metric that saturates near 1 is close to linear in log capacity
again. A fitted predictor saves to one safetensors file (fitted arrays,
JSON manifest) tied to its search space by a fingerprint, so it is not reused on another space.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np
import scipy.optimize
import torch
from scipy.stats import kendalltau
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Kernel, Matern, WhiteKernel
from sklearn.linear_model import BayesianRidge
from sklearn.model_selection import KFold
from sklearn.utils.validation import check_array, check_is_fitted, check_X_y

from ufo.arch import SearchSpace
from ufo.checkpoint import load_checkpoint, save_checkpoint
from ufo.errors import SearchError

if TYPE_CHECKING:
    from ufo.search.latency import LatencyDataset

KIND = "gp_predictor"


def space_fingerprint(space: SearchSpace) -> str:
    """A stable hash of everything that defines `space` (its encodings depend on all of it)."""
    d = space.model_dump(mode="json")
    if d["stem"] == "patch":  # spaces from before the conv stem keep their fingerprint
        del d["stem"], d["stem_channels"]
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


NU_CHOICES = (2.5, 1.5, 0.5)  # Matern smoothness candidates of nu="auto", smoothest first (it wins ties)
ARD_MIN_SAMPLES = 150  # ard="auto": one length scale per feature from this many samples on
FORMAT = 2  # predictor files: 2 = kept columns, mean columns, iso/ARD kernel (1: ARD on every column)


class GPPredictor(RegressorMixin, BaseEstimator):
    """Linear mean + GP on the residuals, on standardised features.

    - `mean_cols`: the columns of X the linear mean (a Bayesian ridge) uses; None for all of them.
      A mean on one strong feature (log parameters, for a metric) generalises from a few dozen
      samples where a ridge on every column overfits.
    - The GP sees the non-constant, distinct columns. Its kernel is `ConstantKernel * Matern +
      WhiteKernel`, hyperparameters by marginal likelihood: first with one shared length scale
      (cheap, robust), then, with `ard` (True, or "auto" from `ARD_MIN_SAMPLES` samples on), one
      length scale per column, started from the shared one and fitted on at most `ard_subsample`
      samples (seeded) for at most `max_iter` L-BFGS steps; the GP is then conditioned on every
      sample with those hyperparameters. That keeps a fit at 400 samples and 40 features to about
      a second, where optimising 40 length scales from scratch on all of them took most of a minute.
    - `nu`: Matern smoothness (0.5, 1.5, 2.5 or inf), or "auto": the one of `NU_CHOICES` with
      the highest marginal likelihood of the shared-length-scale fit.
    - `n_restarts`: extra optimiser starts of the shared-length-scale fit, drawn with `random_state`.
    - `log_target`: fit log(y) (y must be positive) and return exp of the prediction, the std by
      the delta method. `logit_target`: fit log(y / (1 - y)) (every y strictly inside (0, 1)) and
      return the sigmoid, the std again by the delta method.
    """

    def __init__(
        self,
        log_target: bool = False,
        nu: float | str = 2.5,
        n_restarts: int = 0,
        random_state: int = 0,
        logit_target: bool = False,
        mean_cols: Sequence[int] | None = None,
        ard: bool | str = "auto",
        ard_subsample: int = 250,
        max_iter: int = 30,
    ) -> None:
        self.log_target = log_target
        self.logit_target = logit_target
        self.nu = nu
        self.n_restarts = n_restarts
        self.random_state = random_state
        self.mean_cols = mean_cols
        self.ard = ard
        self.ard_subsample = ard_subsample
        self.max_iter = max_iter

    @staticmethod
    def _kernel(length_scale: float | np.ndarray, nu: float, constant: float = 1.0, noise: float = 1e-2) -> Kernel:
        return ConstantKernel(constant, (1e-3, 1e3)) * Matern(length_scale, (1e-2, 1e3), nu=nu) + WhiteKernel(
            noise, (1e-8, 1e1)
        )

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return (X - self.x_mean_) / self.x_scale_

    def _cols(self) -> np.ndarray:
        return (
            np.arange(self.n_features_in_)
            if self.mean_cols is None
            else np.arange(self.n_features_in_)[list(self.mean_cols)]
        )

    def _gp(self, kernel: Kernel, optimizer: Any, restarts: int = 0) -> GaussianProcessRegressor:
        return GaussianProcessRegressor(
            kernel, normalize_y=True, optimizer=optimizer, n_restarts_optimizer=restarts, random_state=self.random_state
        )

    def _fit_gp(
        self, Z: np.ndarray, resid: np.ndarray, kernel: Kernel, optimizer: Any = None, restarts: int = 0
    ) -> GaussianProcessRegressor:
        gp = self._gp(kernel, optimizer, restarts)
        with warnings.catch_warnings():
            # Length scales of irrelevant features run to their upper bound, and the noise of
            # noiseless targets to its lower one: that is ARD working.
            warnings.simplefilter("ignore", ConvergenceWarning)
            gp.fit(Z, resid)
        return gp

    def _short_lbfgs(self, obj_func: Any, theta0: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, float]:
        """sklearn's optimizer hook: L-BFGS-B on the negative log marginal likelihood, `max_iter` steps."""
        r = scipy.optimize.minimize(
            obj_func, theta0, method="L-BFGS-B", jac=True, bounds=bounds, options={"maxiter": self.max_iter}
        )
        return r.x, float(r.fun)

    def fit(self, X: np.ndarray, y: np.ndarray) -> GPPredictor:
        X, y = check_X_y(X, y, y_numeric=True, dtype=np.float64)
        self.n_features_in_ = X.shape[1]
        if len(y) < 3:
            raise SearchError(f"GPPredictor needs at least 3 samples to fit, got {len(y)}")
        if self.log_target and self.logit_target:
            raise SearchError("log_target and logit_target are exclusive: choose one transform of the target")
        if self.log_target:
            if np.any(y <= 0):
                raise SearchError(f"log_target=True needs positive targets; the smallest is {y.min():g}")
            y = np.log(y)
        if self.logit_target:
            if np.any((y <= 0) | (y >= 1)):
                raise SearchError(
                    f"logit_target=True needs targets strictly between 0 and 1; they span [{y.min():g}, {y.max():g}]"
                )
            y = np.log(y / (1 - y))
        if self.ard not in (True, False, "auto"):
            raise SearchError(f"ard={self.ard!r}: expected True, False or 'auto'")
        self.x_mean_ = X.mean(0)
        std = X.std(0)
        self.x_scale_ = np.where(std > 0, std, 1.0)  # constant features (unused blocks) stay at 0
        Z = self._scale(X)
        lin = BayesianRidge().fit(Z[:, self._cols()], y)
        self.coef_, self.intercept_ = np.asarray(lin.coef_, dtype=np.float64), float(lin.intercept_)
        # The GP's columns: non-constant and distinct (a block's FFN-route indicators repeat "the
        # block is in use", which its head count already says); fewer length scales, same function.
        _, first = np.unique(np.round(Z, 9), axis=1, return_index=True)
        self.keep_ = np.zeros(Z.shape[1], bool)
        self.keep_[first] = True
        self.keep_ &= std > 0
        if not self.keep_.any():
            self.keep_[0] = True
        Zk = Z[:, self.keep_]
        resid = y - self._linear(Z)
        nus = NU_CHOICES if self.nu == "auto" else (float(self.nu),)
        fits = [self._fit_gp(Zk, resid, self._kernel(1.0, nu), "fmin_l_bfgs_b", self.n_restarts) for nu in nus]
        iso = max(fits, key=lambda g: g.log_marginal_likelihood_value_)  # ties: the smoothest (first)
        self.nu_ = float(iso.kernel_.k1.k2.nu)
        use_ard = self.ard is True or (self.ard == "auto" and len(y) >= ARD_MIN_SAMPLES)
        if use_ard and Zk.shape[1] > 1:
            k = iso.kernel_
            start = self._kernel(
                np.full(Zk.shape[1], k.k1.k2.length_scale), self.nu_, k.k1.k1.constant_value, k.k2.noise_level
            )
            rows = np.arange(len(y))
            if len(y) > self.ard_subsample:
                rows = np.sort(
                    np.random.default_rng(self.random_state).choice(len(y), self.ard_subsample, replace=False)
                )
            tuned = self._fit_gp(Zk[rows], resid[rows], start, self._short_lbfgs).kernel_
            self.gp_ = self._fit_gp(Zk, resid, tuned)
        else:
            self.gp_ = iso
        self.X_train_ = Zk
        self.residuals_ = resid
        return self

    def _linear(self, Z: np.ndarray) -> np.ndarray:
        return Z[:, self._cols()] @ self.coef_ + self.intercept_

    @overload
    def predict(self, X: np.ndarray, return_std: Literal[False] = False) -> np.ndarray: ...

    @overload
    def predict(self, X: np.ndarray, return_std: Literal[True]) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def predict(self, X: np.ndarray, return_std: bool) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...

    def predict(self, X: np.ndarray, return_std: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predicted target (and its std: the GP's predictive std, noise included) for rows of `X`."""
        check_is_fitted(self, "gp_")
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != self.n_features_in_:
            raise SearchError(
                f"X has {X.shape[1]} features but the predictor was fitted on {self.n_features_in_}; "
                "encode archs of the same search space and task"
            )
        Z = self._scale(X)
        r, s = self.gp_.predict(Z[:, self.keep_], return_std=True)
        mu = self._linear(Z) + r
        if self.log_target:
            mu = np.exp(mu)
            s = mu * s  # delta method: d exp(m) = exp(m) dm
        elif self.logit_target:
            mu = 1 / (1 + np.exp(-mu))
            s = mu * (1 - mu) * s  # d sigmoid(m) = sigmoid(m) (1 - sigmoid(m)) dm
        return (mu, s) if return_std else mu

    # ----- files -----
    def save(self, path: str | Path, space: SearchSpace, meta: dict[str, Any] | None = None) -> Path:
        """Write the fitted predictor for `space` (features from `space.encode`) to one safetensors file.

        `meta` (JSON-able: the target, task, backend, CV scores) is stored in the manifest.
        """
        check_is_fitted(self, "gp_")
        arrays = {
            "x_mean": self.x_mean_,
            "x_scale": self.x_scale_,
            "coef": self.coef_,
            "X_train": self.X_train_,
            "residuals": self.residuals_,
            "kernel_theta": self.gp_.kernel_.theta,
            "keep": self.keep_,
        }
        params = self.get_params()
        params["mean_cols"] = None if self.mean_cols is None else [int(c) for c in self.mean_cols]
        manifest = {
            "kind": KIND,
            "predictor_format": FORMAT,
            "params": params,
            "nu": self.nu_,
            "intercept": self.intercept_,
            "n_features": int(self.n_features_in_),
            "n_train": len(self.residuals_),
            "kernel": repr(self.gp_.kernel_),
            "space_fingerprint": space_fingerprint(space),
            "space": space.model_dump(mode="json"),
            "meta": meta or {},
        }
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)) for k, v in arrays.items()}
        save_checkpoint(path, tensors, manifest)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, space: SearchSpace) -> GPPredictor:
        """Read a predictor written by `save`; refuses one fitted for a different search space."""
        tensors, manifest = load_checkpoint(path)
        if manifest.get("kind") != KIND:
            raise SearchError(f"{path} holds a {manifest.get('kind')!r} checkpoint, not a GP predictor")
        if manifest.get("space_fingerprint") != space_fingerprint(space):
            raise SearchError(
                f"{path} was fitted for another search space (fingerprint "
                f"{manifest.get('space_fingerprint')} vs {space_fingerprint(space)} for this one); "
                "its features would not mean the same thing: fit a predictor for this space"
            )
        if manifest.get("predictor_format") != FORMAT:
            old = manifest.get("predictor_format", 1)
            raise SearchError(
                f"{path} is a GP predictor of an older format ({old}; this UFO reads {FORMAT}): "
                "fit it again (`ufo predictor fit ... --refit`)"
            )
        a = {k: v.numpy().astype(np.float64) for k, v in tensors.items()}
        try:
            self = cls(**manifest["params"])
            self.x_mean_, self.x_scale_, self.coef_ = a["x_mean"], a["x_scale"], a["coef"]
            self.intercept_, self.n_features_in_ = float(manifest["intercept"]), int(manifest["n_features"])
            self.X_train_, self.residuals_, self.keep_ = a["X_train"], a["residuals"], a["keep"].astype(bool)
            self.nu_ = float(manifest["nu"])
            theta = a["kernel_theta"]  # log constant, log length scale(s), log noise
            kernel = self._kernel(np.ones(len(theta) - 2) if len(theta) > 3 else 1.0, self.nu_).clone_with_theta(theta)
        except (KeyError, TypeError, ValueError) as e:
            raise SearchError(f"{path}: incomplete or invalid GP predictor ({type(e).__name__}: {e})") from None
        # Conditioning with the stored hyperparameters and no optimiser recomputes the same GP exactly.
        self.gp_ = self._fit_gp(self.X_train_, self.residuals_, kernel)
        self.meta_ = manifest.get("meta", {})
        return self


# ----- scores -----


def kendall_tau(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Kendall's rank correlation (tau-b): how well the predictor orders archs."""
    return float(kendalltau(np.asarray(y_true), np.asarray(y_pred)).statistic)


def mape(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean absolute percentage error, as a fraction (0.05 is 5%); targets must be non-zero."""
    y_true, y_pred = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if np.any(y_true == 0):
        raise SearchError("MAPE is undefined for zero targets")
    return float(np.mean(np.abs(y_pred - y_true) / np.abs(y_true)))


def cross_validate(
    predictor: BaseEstimator, X: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """K-fold (shuffled with `seed`) scores of a fresh clone of `predictor` per fold.

    `kendall_tau` and `mape` are over all out-of-fold predictions pooled; `*_folds` per fold.
    `mape` is None where a target is zero.
    """
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(y) < 2 * folds:
        raise SearchError(f"cross-validation with {folds} folds needs at least {2 * folds} samples, got {len(y)}")
    pred = np.empty_like(y)
    taus, mapes = [], []
    for tr, te in KFold(folds, shuffle=True, random_state=seed).split(X):
        p = clone(predictor).fit(X[tr], y[tr]).predict(X[te])
        pred[te] = p
        taus.append(kendall_tau(y[te], p))
        mapes.append(mape(y[te], p) if np.all(y[te] != 0) else None)
    pooled = mape(y, pred) if np.all(y != 0) else None  # undefined where a target is 0 (an accuracy of 0)
    return {
        "kendall_tau": kendall_tau(y, pred),
        "mape": pooled,
        "kendall_tau_folds": taus,
        "mape_folds": mapes,
        "folds": folds,
        "n": len(y),
        "predictions": pred.tolist(),
    }


def fit_latency_predictor(
    ds: LatencyDataset, folds: int = 5, seed: int = 0, log_target: bool = True
) -> tuple[GPPredictor, dict[str, Any]]:
    """Cross-validate, then fit on all of `ds`, a GP predictor of median latency from the arch
    encoding. Returns the predictor and the manifest `meta` to save it with (CV scores included)."""
    X, y = ds.features(), ds.targets()
    gp = GPPredictor(log_target=log_target, nu="auto", random_state=seed)
    cv = cross_validate(gp, X, y, folds, seed)
    gp.fit(X, y)
    from ufo.search.features import FEATURES

    meta = {
        "target": "latency_ms",
        "task": ds.task,
        "backend": ds.backend,
        "batch": ds.batch,
        "threads": ds.threads,
        "n": len(ds),
        "features": FEATURES,
        "machine": ds.machine,
        "nu": gp.nu_,
        "cv": {k: v for k, v in cv.items() if k != "predictions"},
    }
    return gp, meta
