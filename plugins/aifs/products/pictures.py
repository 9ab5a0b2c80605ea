"""Pictures a forecaster looks at (matplotlib + cartopy, Agg backend, PNG).

* a map per variable and period: the most likely quintile (colour) and its probability (shade);
* an ensemble plume per point: every member, the mean, mean +/- one standard deviation;
* the run's member durations (from the forecast manifests' timings) and cost at a $/h rate.

Coastlines: cartopy's Natural Earth files are downloaded at first use, which cannot happen offline,
so the coastline is the 0.5 contour of the land mask shipped by the PyPI package ``global-land-mask``
(1 km, subsampled to ~0.17 degrees here).
"""

from __future__ import annotations

import functools

import numpy as np

from aifs.products import regrid

QUINTILE_COLOURS = ["#2166ac", "#92c5de", "#f7f7f7", "#f4a582", "#b2182b"]
_UNITS = {  # shortName -> (label, scale, offset): what a forecaster reads
    "2t": ("2 m temperature (degC)", 1.0, -273.15),
    "msl": ("mean sea-level pressure (hPa)", 0.01, 0.0),
    "tp": ("precipitation since day 18 (mm)", 1000.0, 0.0),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@functools.lru_cache(maxsize=1)
def _land_mask():
    """(lats, lons, mask) ~0.17 degrees; the package holds a 21600 x 43200 mask: sliced, then dropped."""
    from global_land_mask import globe

    step = 20
    mask = np.ascontiguousarray(globe._mask[::step, ::step]).astype(np.float32)
    lats = np.linspace(90, -90, globe._mask.shape[0])[::step]
    lons = np.linspace(-180, 180, globe._mask.shape[1])[::step]
    return lats, lons, mask


def _coastlines(ax, ccrs) -> None:
    lats, lons, mask = _land_mask()
    ax.contour(lons, lats, mask, levels=[0.5], colors="k", linewidths=0.4, transform=ccrs.PlateCarree())


def probability_map(probs: np.ndarray, title: str, path: str) -> None:
    """probs (5, 121, 240) -> map of the most likely quintile, shaded by its probability."""
    plt = _pyplot()
    import cartopy.crs as ccrs
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    likely = probs.argmax(axis=0)
    top = probs.max(axis=0)
    colours = np.array([to_rgb(c) for c in QUINTILE_COLOURS])
    # shade: 0.2 (no signal) -> white, 1.0 -> the quintile's full colour
    weight = np.clip((top - 0.2) / 0.8, 0, 1)[..., None]
    rgb = 1.0 - weight * (1.0 - colours[likely])
    fig = plt.figure(figsize=(10, 5.2))
    ax = fig.add_subplot(1, 1, 1, projection=ccrs.PlateCarree())
    # drawn in the axes' own coordinates (longitudes -180..180): cartopy would otherwise warp the image
    # (~1 s a map) because 0..360 lies outside the projection; the first column is repeated at +180
    half = regrid.RESOLUTION / 2
    west = int(np.searchsorted(regrid.LONGITUDES, 180.0))
    wrapped = np.concatenate([rgb[:, west:], rgb[:, :west + 1]], axis=1)
    ax.imshow(wrapped, extent=[-180 - half, 180 + half, -90 - half, 90 + half], transform=ax.transData,
              origin="upper", interpolation="nearest")
    ax.set_global()
    _coastlines(ax, ccrs)
    ax.set_title(title, fontsize=10)
    handles = [Patch(color=c, label=f"Q{i + 1}") for i, c in enumerate(QUINTILE_COLOURS)]
    ax.legend(handles=handles, loc="lower left", fontsize=7, title="most likely (pale: ~20%, full: 100%)",
              title_fontsize=7, ncol=5)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def plume(point_name: str, steps: tuple[int, ...], series: dict[str, np.ndarray], path: str) -> None:
    """series: shortName -> (members, steps) at the point."""
    plt = _pyplot()
    days = np.asarray(steps) / 24.0
    fig, axes = plt.subplots(len(series), 1, figsize=(8, 2.6 * len(series)), sharex=True)
    axes = np.atleast_1d(axes)
    for ax, (short, values) in zip(axes, sorted(series.items())):
        label, scale, offset = _UNITS.get(short, (short, 1.0, 0.0))
        v = values * scale + offset
        if short == "tp":
            v = v - v[:, :1]  # accumulation since the first step shown
        for row in v:
            ax.plot(days, row, color="0.6", linewidth=0.6)
        mean, spread = np.nanmean(v, axis=0), np.nanstd(v, axis=0)
        ax.fill_between(days, mean - spread, mean + spread, color="tab:blue", alpha=0.25, label="mean +/- 1 sd")
        ax.plot(days, mean, color="tab:blue", linewidth=2, label="ensemble mean")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="upper right")
    axes[0].set_title(f"{point_name}: {values.shape[0]} members", fontsize=10)
    axes[-1].set_xlabel("forecast day")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def durations(members: list[int], seconds: list[float], cost_per_hour: float, path: str) -> str:
    """Bar chart of member wall times; returns the caption (total hours and cost)."""
    plt = _pyplot()
    total_h = sum(seconds) / 3600.0
    caption = f"{len(members)} members, {total_h:.2f} GPU-host hours"
    caption += f", ${total_h * cost_per_hour:.2f} at ${cost_per_hour:g}/h" if cost_per_hour > 0 else " (no $/h rate given)"
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(members) + 2), 3.2))
    ax.bar([str(m) for m in members], np.asarray(seconds) / 60.0, color="tab:green")
    ax.set_xlabel("member")
    ax.set_ylabel("wall time (min)")
    ax.set_title(caption, fontsize=10)
    ax.tick_params(axis="x", labelsize=6)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return caption
