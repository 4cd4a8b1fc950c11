"""`tltoolkit backbones`: what each registered backbone is, its weight sources, and the layers of one."""

from __future__ import annotations

import pandas as pd

from tltoolkit.backbones import create_backbone, get_backbone_cfg, list_backbones


def backbones(names: list[str] | None = None) -> pd.DataFrame:
    """One row per listed backbone: name, family, input size, feature width, parameters, layers, preprocessing,
    weights. Read from the registry, without building any network (test-only backbones are left out).

    `weights` lists the sources `backbone.weights` accepts, each marked `[offline]` when its weights are on this
    machine now or `[download]` when first use needs the network. Parameters and layers are at the backbone's input
    size without its top (`-`: they depend on the weights, e.g. a saved encoder).
    """
    cfgs = [get_backbone_cfg(name) for name in names or list_backbones()]
    rows = [
        {
            "name": cfg.name,
            "family": cfg.family,
            "input_size": cfg.input_size,
            "feature_width": cfg.feature_width,
            "params": cfg.params if cfg.params is not None else "-",
            "layers": cfg.layers if cfg.layers is not None else "-",
            "preprocessing": cfg.preprocessing,
            "weights": ", ".join(
                [f"{s.name} [{'offline' if s.is_cached() else 'download'}]" for s in cfg.weight_sources]
                + ["none", "<file>"]
            ),
        }
        for cfg in cfgs
        if cfg.listed or names
    ]
    return pd.DataFrame(rows)


def backbone_layers(name: str, input_size: int | None = None) -> pd.DataFrame:
    """The layers of one backbone in freeze order: index, name, type, parameters, output shape, and `stage_end`
    (`/2`, `/4`...: the last layer at that reduction, where `tltoolkit probe` measures and auxiliary heads tap)."""
    from tltoolkit.backbones.features import feature_info

    model = create_backbone(name, weights="none", input_size=input_size)
    ends = {info.index: f"/{info.reduction}" for info in feature_info(model)}
    return pd.DataFrame(
        [
            {
                "index": index,
                "name": layer.name,
                "type": type(layer).__name__,
                "params": layer.count_params() if layer.built else 0,
                "output_shape": str(layer.output.shape),  # Every layer of a built functional model has one.
                "stage_end": ends.get(index, ""),
            }
            for index, layer in enumerate(model.layers)
        ]
    ).set_index("index")


def weight_sources(names: list[str] | None = None) -> pd.DataFrame:
    """One row per (backbone, pretrained weight source): whether it is usable offline now, and where it comes from."""
    rows = []
    for name in names or list_backbones():
        cfg = get_backbone_cfg(name)
        for source in cfg.weight_sources:
            rows.append(
                {
                    "backbone": name,
                    "weights": source.name,
                    "offline_now": source.is_cached(),
                    "preprocessing": source.preprocessing or cfg.preprocessing,
                    "source": source.summary,
                }
            )
    return pd.DataFrame(rows)
