"""GPPredictor: recovers smooth functions of the arch encoding, beats a linear fit on nonlinear
targets, reports growing uncertainty away from data, plays with sklearn, and saves safely."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold, cross_val_score

from helpers import tiny_space
from ufo.errors import SearchError
from ufo.search.predictor import GPPredictor, cross_validate, kendall_tau, mape, space_fingerprint

SPACE = tiny_space()


def encoded(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([SPACE.encode(SPACE.sample(rng), ["cls"]) for _ in range(n)])


def target(X: np.ndarray) -> np.ndarray:
    """A smooth nonlinear function of the encoding: linear trend plus sine and cosine terms."""
    z = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    return 5.0 + 0.3 * z[:, 1] + np.sin(1.5 * z[:, 0]) + 0.5 * np.cos(z[:, 2])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    X = encoded(150, 0)
    return X, target(X)


@pytest.fixture(scope="module")
def fitted(data) -> GPPredictor:
    X, y = data
    # the target depends on 3 of 14 features: one length scale per feature (ARD) is what finds them
    return GPPredictor(n_restarts=1, ard=True).fit(X[:50], y[:50])


def test_recovers_smooth_function_ranking(data, fitted):
    X, y = data
    assert kendall_tau(y[50:], fitted.predict(X[50:])) >= 0.9


def test_beats_plain_linear_model_on_nonlinear_target(data, fitted):
    X, y = data
    lin = LinearRegression().fit(X[:50], y[:50])
    gp_r2, lin_r2 = r2_score(y[50:], fitted.predict(X[50:])), r2_score(y[50:], lin.predict(X[50:]))
    assert 1 - gp_r2 < 0.5 * (1 - lin_r2), (gp_r2, lin_r2)  # at most half the linear model's squared error
    assert mape(y[50:], fitted.predict(X[50:])) < mape(y[50:], lin.predict(X[50:]))


def test_std_positive_and_larger_far_from_data(data, fitted):
    X, _ = data
    _, near = fitted.predict(X[50:], return_std=True)
    far_x = X.mean(0) + 8 * X.std(0) + 1.0
    _, far = fitted.predict(far_x[None], return_std=True)
    assert np.all(near > 0)
    assert far[0] > near.max()


def test_works_in_sklearn_cross_val_score(data):
    X, y = data
    est = GPPredictor(n_restarts=0)
    assert clone(est).get_params() == est.get_params()
    assert est.set_params(log_target=True).log_target
    scores = cross_val_score(GPPredictor(n_restarts=0), X[:60], y[:60], cv=KFold(3, shuffle=True, random_state=0))
    assert np.all(np.isfinite(scores)) and scores.mean() > 0.5


def test_cross_validate_reports_tau_and_mape(data):
    X, y = data
    r = cross_validate(GPPredictor(n_restarts=0), X[:40], y[:40], folds=4, seed=0)
    assert r["folds"] == 4 and len(r["kendall_tau_folds"]) == 4 and r["n"] == 40
    assert r["kendall_tau"] > 0.7 and 0 <= r["mape"] < 0.2


def test_log_target_positive_predictions_and_rejects_nonpositive(data):
    X, y = data
    est = GPPredictor(log_target=True, n_restarts=0).fit(X[:40], np.exp(y[:40] / 3))
    mu, sd = est.predict(X[40:60], return_std=True)
    assert np.all(mu > 0) and np.all(sd > 0)
    with pytest.raises(SearchError, match="positive"):
        GPPredictor(log_target=True).fit(X[:10], y[:10] - 10)


def test_logit_target_stays_in_the_unit_interval_and_rejects_bounds(data):
    X, y = data
    acc = 1 / (1 + np.exp(-(y - 5.0)))  # an accuracy-like target in (0, 1), saturating at both ends
    est = GPPredictor(logit_target=True, n_restarts=0).fit(X[:50], acc[:50])
    mu, sd = est.predict(X[50:], return_std=True)
    assert np.all((mu > 0) & (mu < 1)) and np.all(sd > 0)
    assert kendall_tau(acc[50:], mu) > 0.8
    # on the logit scale the target is the smooth function itself: better than fitting it raw
    raw = GPPredictor(n_restarts=0).fit(X[:50], acc[:50]).predict(X[50:])
    assert np.mean(np.abs(mu - acc[50:])) < np.mean(np.abs(raw - acc[50:]))
    with pytest.raises(SearchError, match="strictly between 0 and 1"):
        GPPredictor(logit_target=True).fit(X[:10], np.r_[acc[:9], 1.0])
    with pytest.raises(SearchError, match="exclusive"):
        GPPredictor(logit_target=True, log_target=True).fit(X[:10], acc[:10])


def test_ard_auto_shares_one_length_scale_below_the_threshold_and_ard_above(data):
    from ufo.search.predictor import ARD_MIN_SAMPLES

    X, y = data
    few = GPPredictor().fit(X[:40], y[:40])
    assert np.ndim(few.gp_.kernel_.k1.k2.length_scale) == 0  # one shared length scale
    many = GPPredictor(ard_subsample=60).fit(encoded(ARD_MIN_SAMPLES, 5), target(encoded(ARD_MIN_SAMPLES, 5)))
    assert np.shape(many.gp_.kernel_.k1.k2.length_scale) == (int(many.keep_.sum()),)
    assert many.X_train_.shape[0] == ARD_MIN_SAMPLES  # tuned on a subsample, conditioned on all
    # constant and repeated columns are left out of the GP (not out of the model's input)
    Xd = np.column_stack([X[:40], X[:40, 1], np.ones(40)])
    g = GPPredictor().fit(Xd, y[:40])
    assert g.keep_.sum() <= X.shape[1] and not g.keep_[-1] and not g.keep_[-2]
    np.testing.assert_allclose(g.predict(Xd[:5]), GPPredictor().fit(X[:40], y[:40]).predict(X[:5]), rtol=1e-6)
    with pytest.raises(SearchError, match="ard='yes'"):
        GPPredictor(ard="yes").fit(X[:10], y[:10])


def test_nu_auto_picks_the_smoothness_of_highest_marginal_likelihood(data):
    from ufo.search.predictor import NU_CHOICES

    X, y = data
    auto = GPPredictor(nu="auto", ard=False).fit(X[:50], y[:50])
    lml = {
        nu: GPPredictor(nu=nu, ard=False).fit(X[:50], y[:50]).gp_.log_marginal_likelihood_value_ for nu in NU_CHOICES
    }
    assert auto.nu_ == max(lml, key=lml.get)


def test_fit_metric_predictor_uses_log_params_for_the_mean_and_fits_logits(data):
    from ufo.search.features import LOG_PARAMS
    from ufo.search.metric import MetricDataset, MetricRecord, fit_metric_predictor

    rng = np.random.default_rng(1)
    archs = [SPACE.sample(rng) for _ in range(30)]
    # accuracy grows with capacity: depth and width, plus a small arch-dependent wiggle
    acc = [0.5 + 0.1 * a.depth + 0.002 * a.embed_dim + 0.01 * np.sin(sum(a.num_heads)) for a in archs]
    ds = MetricDataset(
        space=SPACE,
        task="cls",
        metric="top1",
        run="synthetic",
        model_digest="0" * 16,
        split="test",
        seed=0,
        eval_s=0.0,
        records=[MetricRecord(arch=a, value=v, metrics={"top1": v}) for a, v in zip(archs, acc)],
    )
    gp, meta = fit_metric_predictor(ds, folds=3)
    assert meta["target_transform"] == "logit" and gp.logit_target
    assert tuple(gp.mean_cols) == (LOG_PARAMS,) and gp.coef_.shape == (1,)
    assert meta["nu"] == gp.nu_ and gp.nu == "auto"
    assert meta["cv"]["kendall_tau"] > 0.7
    # a metric that reaches 1 cannot be fitted in logit space: the identity is used
    ds.records[0].value = 1.0
    _, meta = fit_metric_predictor(ds, folds=3)
    assert meta["target_transform"] == "identity"


def test_save_load_round_trip_identical(tmp_path, data, fitted):
    X, _ = data
    path = fitted.save(tmp_path / "p.safetensors", SPACE, meta={"target": "synthetic"})
    back = GPPredictor.load(path, SPACE)
    m0, s0 = fitted.predict(X[50:], return_std=True)
    m1, s1 = back.predict(X[50:], return_std=True)
    np.testing.assert_allclose(m1, m0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s1, s0, rtol=1e-12, atol=1e-12)
    assert back.get_params() == fitted.get_params() and back.meta_ == {"target": "synthetic"}


def test_save_load_round_trip_of_a_shared_length_scale_and_a_mean_on_one_column(tmp_path, data):
    X, y = data
    gp = GPPredictor(nu="auto", mean_cols=(1,)).fit(X[:40], y[:40])
    back = GPPredictor.load(gp.save(tmp_path / "p.safetensors", SPACE), SPACE)
    np.testing.assert_allclose(back.predict(X[40:]), gp.predict(X[40:]), rtol=1e-12, atol=1e-12)
    assert back.nu_ == gp.nu_ and list(back.mean_cols) == [1]


def test_a_predictor_file_of_the_older_format_is_refused_with_a_way_out(tmp_path, fitted):
    from ufo.checkpoint import load_checkpoint, save_checkpoint

    path = fitted.save(tmp_path / "p.safetensors", SPACE)
    tensors, manifest = load_checkpoint(path)
    del manifest["predictor_format"]
    save_checkpoint(path, tensors, manifest)
    with pytest.raises(SearchError, match="older format.*fit it again"):
        GPPredictor.load(path, SPACE)


def test_load_for_another_space_is_refused(tmp_path, fitted):
    path = fitted.save(tmp_path / "p.safetensors", SPACE)
    other = tiny_space(embed_dim=[16, 24, 32, 40])
    assert space_fingerprint(other) != space_fingerprint(SPACE)
    with pytest.raises(SearchError, match="another search space"):
        GPPredictor.load(path, other)


def test_wrong_feature_count_and_unfitted_errors(data, fitted):
    X, _ = data
    with pytest.raises(SearchError, match="features"):
        fitted.predict(X[:, :5])
    with pytest.raises(SearchError, match="at least 3"):
        GPPredictor().fit(X[:2], X[:2, 0])
