"""`load`: open a MiniMax checkpoint, stock or packed, as a patched mlx-lm model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import mlx.nn as nn

from fused_moe import format
from fused_moe.layer import MiniMaxMoE
from fused_moe.patch import BLOCK_ATTR, block_path, check_minimax, patch


def packed_layers(config: dict, where: str) -> Optional[dict]:
    """The per-layer quantization of a packed checkpoint's config, or None for
    a stock checkpoint. Refuses format versions this package cannot read."""
    section = config.get(format.CONFIG_KEY)
    if section is None:
        return None
    version = section.get(format.CONFIG_FORMAT_VERSION)
    if version != format.FORMAT_VERSION:
        newer = isinstance(version, int) and version > format.FORMAT_VERSION
        raise ValueError(
            f"{where}: packed format version {version!r}"
            + (" is newer than this fused_moe" if newer else " is not supported")
            + f" (it reads version {format.FORMAT_VERSION})"
            + ("; upgrade mlx-fused-moe" if newer else "")
        )
    return section[format.CONFIG_LAYERS]


def _packed_model_factory(model_class, layers: dict, where: str):
    """A model constructor for `mlx_lm.utils.load_model` that builds the stock
    model, then puts a `MiniMaxMoE` with each layer's recorded bits where the
    stock block was, so the packed tensors load by name."""

    def build(args) -> nn.Module:
        model = model_class(args)
        check_minimax(model, where)
        for i, layer in enumerate(model.layers):
            path = block_path(i)
            if path not in layers:
                raise ValueError(f"{where}: config.json has no {format.CONFIG_KEY} entry for {path}")
            gate_up, down = (layers[path][p] for p in format.PROJECTIONS)
            setattr(
                layer,
                BLOCK_ATTR,
                MiniMaxMoE(
                    args,
                    bits=gate_up["bits"],
                    group_size=gate_up["group_size"],
                    down_bits=down["bits"],
                    down_group_size=down["group_size"],
                ),
            )
        return model

    return build


# The keyword arguments of mlx_lm.load this function passes on.
LOAD_KWARGS = (
    "tokenizer_config",
    "model_config",
    "adapter_path",
    "lazy",
    "return_config",
    "revision",
    "trust_remote_code",
)


def load(path: str, *, tensor_group=None, **kwargs: Any):
    """Loads a MiniMax checkpoint as an mlx-lm model with fused MoE layers.

    * A stock mlx-lm checkpoint (quantized experts) is loaded by mlx-lm and
      then :func:`fused_moe.patch`-ed, layer by layer.
    * A packed checkpoint (``fused-moe convert``) is opened directly: the
      fused layers are built first and the packed tensors load into them,
      with no repacking.

    Keyword arguments go to mlx-lm's loading (``tokenizer_config``,
    ``model_config``, ``adapter_path``, ``lazy``, ``return_config``,
    ``revision``, ``trust_remote_code``), as for ``mlx_lm.load``.

    Returns ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with
    ``return_config=True``.
    """
    from mlx_lm import utils

    if unknown := sorted(set(kwargs) - set(LOAD_KWARGS)):
        raise TypeError(
            f"fused_moe.load: unexpected keyword arguments {unknown}; mlx-lm's "
            f"loading takes {list(LOAD_KWARGS)}"
        )
    if tensor_group is not None:
        raise NotImplementedError(
            "fused_moe.load: tensor_group (tensor parallelism) is not supported yet"
        )
    model_path = utils._download(path, revision=kwargs.get("revision"))
    where = f"fused_moe.load({str(path)!r})"
    config = utils.load_config(Path(model_path))
    config.update(kwargs.get("model_config") or {})
    layers = packed_layers(config, where)

    if layers is None:
        loaded = utils.load(path, **kwargs)
        patch(loaded[0])
        return loaded

    # The same pieces mlx_lm.load puts together, with the fused layers'
    # constructor in place of the stock model class.
    def model_classes(config):
        model_class, args_class = utils._get_classes(config)
        return _packed_model_factory(model_class, layers, where), args_class

    model, config = utils.load_model(
        Path(model_path),
        kwargs.get("lazy", False),
        model_config=kwargs.get("model_config"),
        get_model_classes=model_classes,
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    if kwargs.get("adapter_path") is not None:
        model = utils.load_adapters(model, kwargs["adapter_path"])
        model.eval()
    tokenizer = utils.load_tokenizer(
        model_path, kwargs.get("tokenizer_config"), eos_token_ids=config.get("eos_token_id")
    )
    if kwargs.get("return_config", False):
        return model, tokenizer, config
    return model, tokenizer
