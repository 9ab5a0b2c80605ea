"""aifs.products pieces: the package's periods, MIR regridding, probabilities' edge cases."""

from __future__ import annotations

import numpy as np
import pytest

ORIGINAL_SCRIPTS = {1: (438, 576), 2: (582, 792)}  # what the hand-run scripts averaged: wrong


def test_periods_are_the_package_days_not_the_original_scripts_steps():
    from aifs.products import periods

    by = {(p.variable, p.number): p for p in periods.periods()}
    assert by[("tas", 1)].steps == tuple(range(432, 595, 6)) and by[("mslp", 2)].steps == tuple(range(600, 763, 6))
    assert by[("pr", 1)].steps == (432, 600) and by[("pr", 2)].steps == (600, 768)
    for number, (first, last) in ORIGINAL_SCRIPTS.items():
        assert by[("tas", number)].steps != tuple(range(first, last + 1, 6))
    assert periods.LAST_STEP == 768


@pytest.mark.parametrize("method", ["linear", "grid-box-average"])
def test_regrid_constant_is_the_constant(method):
    from aifs.products import regrid
    from aifs.testing import products_data

    size = products_data.grid_size("N32")
    out = regrid.to_competition_grid(np.full(size, 287.5), {"grid": "N32"}, method)
    assert out.shape == (121, 240)
    np.testing.assert_allclose(out, 287.5, rtol=0, atol=1e-9)


def test_regrid_smooth_field_within_interpolation_error():
    from aifs.products import regrid
    from aifs.testing import products_data

    lats, lons = products_data.grid_latlons("N48")
    # smooth on the sphere (single-valued at the poles): a zonal wave that vanishes there
    f = lambda la, lo: 280 + 20 * np.cos(np.radians(la)) ** 2 + 5 * np.cos(np.radians(la)) * np.sin(np.radians(lo))  # noqa: E731
    out = regrid.to_competition_grid(f(lats, lons), {"grid": "N48"}, "linear")
    lo2, la2 = np.meshgrid(regrid.LONGITUDES, regrid.LATITUDES)
    err = np.abs(out - f(la2, lo2))
    assert err.max() < 0.15, err.max()  # N48 is ~1.9 degrees: second-order error of a 20 K wave


def test_probabilities_all_equal_edges_still_sum_to_one():
    from aifs.products.probabilities import quintile_probabilities

    edges = np.zeros((4, 2, 3))
    members = np.stack([np.zeros((2, 3)), np.full((2, 3), 0.01)])
    probs = quintile_probabilities(members, edges)
    np.testing.assert_array_equal(probs.sum(axis=0), 1.0)
    np.testing.assert_array_equal(probs[4], 1.0)  # zero rain at edges all zero is "at or above" the top edge


def test_points_parse_and_refuse():
    from aifs.products.ensemble import parse_points

    pts = parse_points("Nairobi:-1.29,36.82; Kampala:0.35,32.58")
    assert [p.name for p in pts] == ["Nairobi", "Kampala"] and pts[0].lat == -1.29
    with pytest.raises(ValueError, match="Nowhere"):
        parse_points("Nowhere:91,0")
