"""kmt.data.inspect / clean on crafted bad data, and the shared NaN/Inf check."""

import numpy as np
import pytest

import keras_microtune as kmt


@pytest.fixture
def bad(rng):
    x = rng.normal(0.0, 1.0, (50, 10, 4))
    x[3, 2, 1] = np.nan
    x[7, 0, 1] = np.nan
    x[9, 5, 2] = np.inf
    x[:, :, 3] = 2.5  # a stuck sensor
    x[20, 4, 0] = 40.0  # a spike
    return x


def test_inspect_finds_everything(bad):
    report = kmt.data.inspect(bad, sigma=5)
    assert report.nan == 2 and report.inf == 1
    assert report.nonfinite_samples == [3, 7, 9]
    assert report.nan_channels == [1] and report.inf_channels == [2]
    assert report.constant_channels == [3]
    assert report.outlier_samples == [20] and report.outliers[0] == 1
    assert report.mean[3] == pytest.approx(2.5) and report.std[3] == 0
    assert not report.ok
    text = str(report)
    assert "constant channel(s): [3]" in text and "NaN: 2" in text


def test_inspect_clean_data_is_ok(rng):
    report = kmt.data.inspect(rng.normal(size=(100, 3)))
    assert report.ok and "no NaN" in str(report)


@pytest.mark.parametrize(
    "nan, expected_len, value",
    [("drop", 47, None), ("zero", 50, 0.0), ("mean", 50, "mean")],
)
def test_clean_nan_fixes(bad, nan, expected_len, value):
    y = np.arange(50)
    x, y2 = kmt.data.clean(bad, y, nan=nan, inf="drop" if nan == "drop" else nan)
    assert len(x) == len(y2) == expected_len and np.isfinite(x).all()
    if nan == "drop":
        assert 3 not in y2 and 9 not in y2
    else:
        expected = (
            0.0 if value == 0.0 else np.nanmean(bad[..., 1][np.isfinite(bad[..., 1])])
        )
        assert x[3, 2, 1] == pytest.approx(expected, abs=1e-6)


def test_clean_inf_clip_and_sigma(bad):
    x = kmt.data.clean(bad, nan="zero", inf="clip", clip_sigma=3)
    assert np.isfinite(x).all() and x.dtype == np.float32
    assert x[20, 4, 0] < 10  # the spike is clipped to mean + 3 std
    assert np.all(x[..., 3] == 2.5)


def test_clean_rejects_unknown_fix(bad):
    with pytest.raises(ValueError, match="expected one of"):
        kmt.data.clean(bad, nan="interpolate")
    with pytest.raises(ValueError, match="sample 3, channel 1"):
        kmt.data.clean(bad, nan="raise")


def test_as_arrays_names_sample_and_channel(bad):
    with pytest.raises(ValueError, match=r"NaN in sample 3, channel 1 \(3 of 50"):
        kmt.data.as_arrays(bad, [(10, 4)])
