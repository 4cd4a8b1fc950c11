"""`tltoolkit backbones`: what each registered backbone is, its weight sources, and the layers of one."""

from __future__ import annotations

import pandas as pd

from tltoolkit.backbones import create_backbone, get_backbone_cfg, list_backbones


def backbones(names: list[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """One row per backbone: name, family, input size, feature width, parameters, layers, preprocessing, weights.

    `weights` lists the sources `backbone.weights` accepts, each marked `[offline]` when its weights are on this
    machine now or `[download]` when first use needs the network. Parameter and layer counts come from building
    each backbone without weights (a few seconds each).
    """
    import keras

    names = names or list_backbones()
    bar = keras.utils.Progbar(len(names), unit_name="backbone") if progress and len(names) > 1 else None
    rows = []
    for done, name in enumerate(names, start=1):
        cfg = get_backbone_cfg(name)
        model = create_backbone(name, weights="none", input_size=cfg.input_size)
        rows.append(
            {
                "name": name,
                "family": cfg.family,
                "input_size": cfg.input_size,
                "feature_width": cfg.feature_width,
                "params": model.count_params(),
                "layers": len(model.layers),
                "preprocessing": cfg.preprocessing,
                "weights": ", ".join(
                    [f"{s.name} [{'offline' if s.is_cached() else 'download'}]" for s in cfg.weight_sources]
                    + ["none", "<file>"]
                ),
            }
        )
        keras.backend.clear_session()
        if bar is not None:
            bar.update(done)
    return pd.DataFrame(rows)


def backbone_layers(name: str, input_size: int | None = None) -> pd.DataFrame:
    """The layers of one backbone in freeze order: index, name, type, parameters, output shape."""
    model = create_backbone(name, weights="none", input_size=input_size)
    return pd.DataFrame(
        [
            {
                "index": index,
                "name": layer.name,
                "type": type(layer).__name__,
                "params": layer.count_params() if layer.built else 0,
                "output_shape": str(layer.output.shape),  # Every layer of a built functional model has one.
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
