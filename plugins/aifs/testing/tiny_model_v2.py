"""A tiny, untrained AIFS-ENS 2.0: the real anemoi-models 0.11 ensemble architecture at a tiny size.

Only the v2 worker environment (anemoi-models 0.11.x, torch-geometric) imports this module.

What anemoi-training saves for inference, built here without training:

- ``AnemoiModelInterface`` (the module the runner calls ``predict_step`` on) wrapping
  ``AnemoiEnsModelEncProcDec``: graph-transformer encoder (data -> hidden), graph-transformer
  processor (hidden -> hidden) with noise conditioning (the ensemble's noise, from torch's RNG,
  so the runner's seed makes members differ), graph-transformer decoder (hidden -> data);
- the graph, a torch_geometric ``HeteroData``: data nodes at the grid's latitudes/longitudes,
  a coarser hidden node set (a Fibonacci sphere), k-nearest-neighbour edges data->hidden,
  hidden->hidden and hidden->data carrying ``edge_length`` and ``edge_dirs``;
- the input/output processors anemoi-models applies inside ``predict_step``, recorded as
  anemoi-training records them (``config.data.processors``): an ``InputImputer`` that fills NaN
  with the variable's mean on the way in and puts NaN back where it was on the way out (snow and
  soil over sea, waves over land), then an ``InputNormalizer`` (mean/std);
- the metadata of AIFS-ENS 2.0's kinds of fields (tiny_model.anemoi_metadata): 10 hPa levels,
  ``sd``/``swvl1``/``swvl2``, waves with the mean wave direction as ``cos_mwd``/``sin_mwd``, snow
  cover ``snowc`` as an output, accumulations, constant and computed forcings.

Weights are random: the output is not a forecast, but every tensor goes through the same code
as the real checkpoint's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from aifs.testing.tiny_model import anemoi_metadata, builtin_grid_latlon, save_checkpoint

#: AIFS-ENS 2.0's ocean-wave variables (anemoi names; the direction as cos/sin inside the model).
WAVES = ["swh", "mwp", "cos_mwd", "sin_mwd", "h1012", "h1214", "h1417", "h1721", "h2125", "h2530", "cdww", "wmb"]
#: Land-only fields, NaN over sea in the inputs ECMWF open data gives.
LAND_ONLY = ["sd", "swvl1", "swvl2"]
#: The tiny model's variables: one or more of every kind AIFS-ENS 2.0 has (the test set).
PROGNOSTIC = ["10u", "10v", "2t", "msl", "t_850", "z_500", "q_850", "w_850", "t_10", "z_10", *LAND_ONLY, *WAVES]
CONSTANT = ["lsm", "z"]
DIAGNOSTIC = ["tp", "cp", "snowc"]

#: The benchmark's set: 120 output fields a step, AIFS-ENS 2.0's count (14 levels with 10 hPa, q_10 excepted).
PRESSURE_LEVELS = [10, 50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000]
BENCH_PROGNOSTIC = (
    ["10u", "10v", "2d", "2t", "msl", "skt", "sp", "tcw", "stl1", "stl2", *LAND_ONLY, *WAVES]
    + [f"{p}_{lev}" for p in ("q", "t", "u", "v", "w", "z") for lev in PRESSURE_LEVELS if (p, lev) != ("q", 10)]
)
BENCH_CONSTANT = ["lsm", "z", "slor", "sdor"]
BENCH_DIAGNOSTIC = ["tp", "cp", "sf", "ro", "ssrd", "strd", "tcc", "hcc", "lcc", "mcc", "100u", "100v", "snowc"]  # 108 + 13 model outputs: 120 GRIB fields once cos_mwd/sin_mwd are one mwd

#: Typical mean and spread per GRIB parameter, for the normalizer's statistics.
_STATISTICS = {
    "2t": (288.0, 15.0), "2d": (283.0, 15.0), "skt": (288.0, 15.0), "stl1": (285.0, 12.0), "stl2": (285.0, 12.0),
    "msl": (101325.0, 1000.0), "sp": (98000.0, 5000.0), "t": (250.0, 20.0), "z": (50000.0, 30000.0),
    "q": (0.005, 0.005), "w": (0.0, 0.2), "tcw": (20.0, 15.0), "lsm": (0.3, 0.45), "sd": (0.1, 0.5),
    "swvl1": (0.3, 0.1), "swvl2": (0.3, 0.1), "swh": (1.5, 1.0), "mwp": (7.0, 2.0), "cos_mwd": (0.0, 0.7),
    "sin_mwd": (0.0, 0.7), "cdww": (0.0013, 0.0005), "wmb": (3000.0, 2000.0), "slor": (0.01, 0.01),
    "sdor": (50.0, 80.0), "snowc": (10.0, 30.0),
}
_GRAPH_ATTRIBUTES = ["edge_length", "edge_dirs"]
_CHANNELS = 16
_NOISE_CHANNELS = 4


def _statistic(name: str) -> tuple[float, float]:
    param = name.rpartition("_")[0] if name.rpartition("_")[2].isdigit() else name
    return _STATISTICS.get(name, _STATISTICS.get(param, (0.0, 1.0)))


def _unit_vectors(lat_deg: np.ndarray, lon_deg: np.ndarray) -> np.ndarray:
    lat, lon = np.deg2rad(lat_deg), np.deg2rad(lon_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def fibonacci_sphere(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` nearly evenly spaced points on the sphere: the hidden mesh (degrees)."""
    i = np.arange(n) + 0.5
    lat = np.rad2deg(np.arcsin(1 - 2 * i / n))
    lon = np.rad2deg((math.pi * (1 + 5**0.5) * i) % (2 * math.pi))
    return lat, lon


def _knn_edges(src_latlon, dst_latlon, k: int) -> dict[str, torch.Tensor]:
    """Edges from each destination node's ``k`` nearest source nodes, with anemoi's edge attributes."""
    from scipy.spatial import cKDTree

    src, dst = _unit_vectors(*src_latlon), _unit_vectors(*dst_latlon)
    _, nearest = cKDTree(src).query(dst, k=k)
    nearest = nearest.reshape(len(dst), k)
    src_index = nearest.reshape(-1)
    dst_index = np.repeat(np.arange(len(dst)), k)
    chord = np.linalg.norm(src[src_index] - dst[dst_index], axis=-1)
    length = 2 * np.arcsin(np.clip(chord / 2, 0, 1))
    dlat = np.deg2rad(dst_latlon[0][dst_index] - src_latlon[0][src_index])
    dlon = np.deg2rad((dst_latlon[1][dst_index] - src_latlon[1][src_index] + 180) % 360 - 180)
    dirs = np.stack([dlat, dlon * np.cos(np.deg2rad(dst_latlon[0][dst_index]))], axis=-1)
    dirs /= np.maximum(np.linalg.norm(dirs, axis=-1, keepdims=True), 1e-12)
    return {
        "edge_index": torch.from_numpy(np.stack([src_index, dst_index]).astype(np.int64)),
        "edge_length": torch.from_numpy((length / max(length.max(), 1e-12)).astype(np.float32)[:, None]),
        "edge_dirs": torch.from_numpy(dirs.astype(np.float32)),
    }


def build_graph(latitudes: np.ndarray, longitudes: np.ndarray, hidden_nodes: int = 256):
    """The encoder-processor-decoder graph for a grid (a HeteroData, as anemoi-graphs would make it)."""
    from torch_geometric.data import HeteroData

    data = (np.asarray(latitudes, "f8"), np.asarray(longitudes, "f8") % 360)
    hidden = fibonacci_sphere(hidden_nodes)
    graph = HeteroData()
    for name, (lat, lon) in (("data", data), ("hidden", hidden)):
        graph[name].x = torch.from_numpy(np.deg2rad(np.stack([lat, lon], axis=-1)).astype(np.float32))
    for (src, dst), (src_ll, dst_ll), k in (
        (("data", "hidden"), (data, hidden), 4),  # every hidden node gathers its 4 nearest grid points ...
        (("hidden", "hidden"), (hidden, hidden), 6),
        (("hidden", "data"), (hidden, data), 3),  # ... and every grid point reads its 3 nearest hidden nodes
    ):
        for key, value in _knn_edges(src_ll, dst_ll, k).items():
            setattr(graph[(src, "to", dst)], key, value)
    if len(data[0]) > 4 * hidden_nodes:  # grid points no hidden node chose: give each one an encoder edge too
        enc = graph[("data", "to", "hidden")]
        reached = np.zeros(len(data[0]), bool)
        reached[enc.edge_index[0].numpy()] = True
        if not reached.all():
            rest = np.flatnonzero(~reached)
            extra = _knn_edges(hidden, (data[0][rest], data[1][rest]), 1)
            # reversed: the orphan grid point is the source, its nearest hidden node the destination
            index = torch.stack([torch.from_numpy(rest)[extra["edge_index"][1]], extra["edge_index"][0]])
            enc.edge_index = torch.cat([enc.edge_index, index], dim=1)
            enc.edge_length = torch.cat([enc.edge_length, extra["edge_length"]])
            enc.edge_dirs = torch.cat([enc.edge_dirs, -extra["edge_dirs"]])
    return graph


def _mapper(target: str, **extra) -> dict:
    return {
        "_target_": f"anemoi.models.layers.mapper.{target}",
        "trainable_size": 0,
        "sub_graph_edge_attributes": _GRAPH_ATTRIBUTES,
        "num_chunks": 1,
        "mlp_hidden_ratio": 2,
        "num_heads": 2,
        "qk_norm": False,
        "cpu_offload": False,
        "graph_attention_backend": "triton",  # falls back to torch-geometric where triton is absent (CPU)
        "layer_kernels": {"LayerNorm": {"_target_": "torch.nn.LayerNorm"}, "Linear": {"_target_": "torch.nn.Linear"},
                          "Activation": {"_target_": "torch.nn.GELU"}},
        **extra,
    }


def training_config(forcing: list[str], diagnostic: list[str], imputed: list[str], unnormalized: list[str]) -> dict:
    """The ``config`` anemoi-training records, the parts the model and the worker read."""
    return {
        "training": {"multistep_input": 2, "precision": "32"},
        "graph": {"data": "data", "hidden": "hidden"},
        "data": {
            "timestep": "6h",
            "forcing": forcing,
            "diagnostic": diagnostic,
            # applied in order on the way in, in reverse on the way out (anemoi.models.preprocessing)
            "processors": {
                "imputer": {
                    "_target_": "anemoi.models.preprocessing.imputer.InputImputer",
                    "config": {"default": "none", "mean": imputed},
                },
                "normalizer": {
                    "_target_": "anemoi.models.preprocessing.normalizer.InputNormalizer",
                    "config": {"default": "mean-std", "none": unnormalized},
                },
            },
        },
        "model": {
            "model": {"_target_": "anemoi.models.models.ens_encoder_processor_decoder.AnemoiEnsModelEncProcDec"},
            "num_channels": _CHANNELS,
            "condition_on_residual": True,
            "trainable_parameters": {"data": 0, "hidden": 0, "data2hidden": 0, "hidden2data": 0, "hidden2hidden": 0},
            "noise_injector": {
                "_target_": "anemoi.models.layers.ensemble.NoiseConditioning",
                "noise_std": 1,
                "noise_channels_dim": _NOISE_CHANNELS,
                "noise_mlp_hidden_dim": 8,
                "layer_kernels": {"Activation": {"_target_": "torch.nn.GELU"}},
            },
            "encoder": _mapper("GraphTransformerForwardMapper"),
            "processor": {
                **_mapper("GraphTransformerForwardMapper"),
                "_target_": "anemoi.models.layers.processor.GraphTransformerProcessor",
                "num_layers": 2,
                "layer_kernels": {  # the ensemble noise conditions the processor's layer norms
                    "LayerNorm": {"_target_": "anemoi.models.layers.normalization.ConditionalLayerNorm",
                                  "condition_shape": _NOISE_CHANNELS, "zero_init": False, "autocast": False},
                    "Linear": {"_target_": "torch.nn.Linear"},
                    "Activation": {"_target_": "torch.nn.GELU"},
                },
            },
            "decoder": _mapper("GraphTransformerBackwardMapper", initialise_data_extractor_zero=False),
            "residual": {"_target_": "anemoi.models.layers.residual.SkipConnection", "step": -1},
            "bounding": [],
        },
    }


def build_model(grid: str, prognostic, constant, diagnostic, hidden_nodes: int = 256):
    """``(AnemoiModelInterface, anemoi metadata)`` for a tiny v2 model on ``grid``."""
    from anemoi.models.data_indices.collection import IndexCollection
    from anemoi.models.interface import AnemoiModelInterface
    from anemoi.utils.config import DotDict
    from omegaconf import OmegaConf

    from aifs.testing.tiny_model import COMPUTED

    metadata, _, _ = anemoi_metadata(grid, prognostic, constant, diagnostic)
    variables = metadata["dataset"]["variables"]
    forcing = metadata["config"]["data"]["forcing"]
    imputed = [v for v in variables if v in LAND_ONLY or v in WAVES]
    config = training_config(forcing, list(diagnostic), imputed, unnormalized=list(COMPUTED))
    metadata["config"] = config

    name_to_index = {v: i for i, v in enumerate(variables)}
    data_indices = IndexCollection(OmegaConf.create(config), name_to_index)
    means, stdevs = np.array([_statistic(v) for v in variables], "f8").T
    statistics = {"mean": means, "stdev": stdevs, "minimum": means - 3 * stdevs, "maximum": means + 3 * stdevs}
    latitudes, longitudes = builtin_grid_latlon(grid)
    graph = build_graph(latitudes, longitudes, hidden_nodes)
    model = AnemoiModelInterface(
        config=DotDict(config), graph_data=graph, statistics=statistics, data_indices=data_indices,
        metadata={}, supporting_arrays={"latitudes": latitudes, "longitudes": longitudes},
    )
    model.eval()
    return model, metadata


def build_checkpoint(
    path: str,
    grid: str = "O48",
    prognostic: list[str] = PROGNOSTIC,
    constant: list[str] = CONSTANT,
    diagnostic: list[str] = DIAGNOSTIC,
    hidden_nodes: int = 256,
    seed: int = 0,
) -> str:
    """Write a tiny AIFS-ENS 2.0 checkpoint (random weights from ``seed``) for a builtin grid."""
    torch.manual_seed(seed)
    model, metadata = build_model(grid, prognostic, constant, diagnostic, hidden_nodes)
    return save_checkpoint(path, model, metadata, grid)
