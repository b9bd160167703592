"""`load`: open an mlx-lm MoE checkpoint, stock or packed, as a patched model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from mlx.utils import tree_unflatten
from mlx_lm import utils
from mlx_lm.models import minimax

from fused_moe.checkpoint.files import read_config
from fused_moe.checkpoint.minimax import MODEL_TYPES, block_path
from fused_moe.checkpoint.safetensors import read_header
from fused_moe.checkpoint.sources import HFCheckpoint, open_checkpoint
from fused_moe.errors import CheckpointError, UnsupportedError
from fused_moe.models.experts import FusedExperts
from fused_moe.models.minimax_moe import MiniMaxMoE
from fused_moe.models.patch import EXPERT_CLASSES, patch, swap_dense_layers
from fused_moe.models.tensor_parallel import check_split, read_own_experts, shard
from fused_moe.packed import spec


def _local_path(path: str, revision) -> Path:
    """The checkpoint directory `path` names: a local directory, or a Hugging
    Face hub id, downloaded (or found in the cache) as mlx-lm does."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        return local
    # A hub id is "name" or "org/name"; anything else was meant as a path.
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or "\\" in path:
        raise CheckpointError(f"{path}: no such directory")
    try:
        return Path(utils._download(path, revision=revision))
    except HFValidationError:
        raise CheckpointError(f"{path}: no such directory, and not a Hugging Face hub id") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise CheckpointError(
            f"{path}: no such directory, and not in the Hugging Face cache; the hub cannot be reached "
            f"(offline). Download it first (huggingface-cli download {path}) or give a local directory"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise CheckpointError(f"{path}: no such directory, nor a model on the Hugging Face hub "
                              f"({type(e).__name__})") from None


def check_checkpoint(model_path: Path, where: str) -> None:
    """The converter's checks of a checkpoint (config.json, the index, every
    file's header, config.json against the tensors' shapes and dtypes),
    before mlx-lm or MLX's own safetensors loader reads a byte: MLX's loader
    accepts negative and overflowing shapes. Raises a one-line
    CheckpointError naming the file and the tensor."""
    spec.packed_experts(read_config(model_path), str(model_path / "config.json"))  # a newer format says so first
    checkpoint = open_checkpoint(model_path)
    if isinstance(checkpoint, HFCheckpoint):
        raise CheckpointError(
            f"{model_path} is a {checkpoint.describe()}: fused_moe.load opens mlx-lm quantized and packed "
            f"checkpoints. Convert it first, e.g. fused-moe convert {model_path} "
            f"{str(model_path).rstrip('/')}-fused --recipe seed-3.7bit"
        )
    # mlx-lm loads every model*.safetensors, whether the index lists it or not.
    for file in sorted(model_path.glob("model*.safetensors")):
        read_header(file)


def _packed_model_factory(model_class, packed: dict, where: str):
    """A model constructor for `mlx_lm.utils.load_model` that builds the stock
    model, then puts an empty fused module of the recorded settings wherever
    the packed checkpoint has experts (MiniMax's fused block at a
    "fused_experts" path, a FusedExperts in place of a SwitchGLU/SwitchMLP
    anywhere else), so the packed tensors load by name."""

    def build(args) -> nn.Module:
        model = model_class(args)
        modules = dict(model.named_modules())
        swaps = []
        for path, specs in packed.items():
            parent, _, name = path.rpartition(".")
            if name == spec.MODULE_NAME and type(modules.get(parent)) is minimax.MiniMaxSparseMoeBlock:
                swaps.append((parent, MiniMaxMoE(args, specs=specs)))
            elif type(modules.get(path)) in EXPERT_CLASSES:
                swaps.append((path, FusedExperts.placeholder(modules[path], specs, mx.float32)))
            else:
                found = type(modules[path]).__name__ if path in modules else "nothing"
                raise CheckpointError(f"{where}: config.json describes packed experts at {path}, where the "
                                      f"{type(model).__module__} model has {found}")
        model.update_modules(tree_unflatten(swaps))
        return model

    return build


# The keyword arguments of mlx_lm.load this function passes on, and those
# mlx-lm's sharded_load also takes (with tensor_group).
LOAD_KWARGS = (
    "tokenizer_config",
    "model_config",
    "adapter_path",
    "lazy",
    "return_config",
    "revision",
    "trust_remote_code",
)
SHARDED_LOAD_KWARGS = ("tokenizer_config", "return_config", "trust_remote_code")


def _load_packed_model(model_path: Path, layers: dict, where: str, lazy: bool, **kwargs):
    # The same pieces mlx_lm.load puts together, with the fused layers'
    # constructor in place of the stock model class.
    def model_classes(config):
        model_class, args_class = utils._get_classes(config)
        return _packed_model_factory(model_class, layers, where), args_class

    return utils.load_model(model_path, lazy, get_model_classes=model_classes, **kwargs)


def _stock_split_check(config: dict, ranks: int, where: str) -> None:
    """The H split's group check for a stock checkpoint, from its config alone,
    before mlx-lm slices anything."""
    quantization = config.get("quantization") or {}
    for i in range(config["num_hidden_layers"]):
        entry = quantization.get(f"{block_path(i)}.switch_mlp.down_proj")
        group = entry["group_size"] if isinstance(entry, dict) else quantization.get("group_size", 64)
        check_split(config["intermediate_size"], ranks, group, f"{where}: {block_path(i)}")


def _load_sharded(model_path: Path, config: dict, layers, group, where: str, kwargs):
    """mlx-lm's sharded loading, step by step, with each rank reading only its
    own slice of every expert tensor from the files."""
    if unsupported := sorted(set(kwargs) - set(SHARDED_LOAD_KWARGS)):
        raise TypeError(f"{where}: {unsupported} cannot be combined with tensor_group")
    if config.get("model_type") not in MODEL_TYPES:
        raise UnsupportedError(f"{where}: tensor parallelism takes MiniMax models ({', '.join(MODEL_TYPES)}), "
                               f"not model_type {config.get('model_type')!r}")
    trust = kwargs.get("trust_remote_code", False)
    if layers is None:
        _stock_split_check(config, group.size(), where)
        model, config = utils.load_model(model_path, lazy=True, strict=False, trust_remote_code=trust)
        model.shard(group)
        read_own_experts(model, model_path, group, config["intermediate_size"])
        patch(model)
    else:
        model, config = _load_packed_model(model_path, layers, where, True, trust_remote_code=trust)
        shard(model, group)
        read_own_experts(model, model_path, group, config["intermediate_size"])
        swap_dense_layers(model)
    tokenizer = utils.load_tokenizer(
        model_path,
        kwargs.get("tokenizer_config") or {"trust_remote_code": trust},
        eos_token_ids=config.get("eos_token_id"),
    )
    # Every rank ready before the first collective of the forward pass.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return (model, tokenizer, config) if kwargs.get("return_config", False) else (model, tokenizer)


def load(path: str, *, tensor_group=None, **kwargs: Any):
    """Loads an mlx-lm MoE checkpoint (any model type mlx-lm runs) as a model
    with fused experts.

    * A stock mlx-lm checkpoint (quantized experts) is loaded by mlx-lm and
      then :func:`fused_moe.patch`-ed, layer by layer.
    * A packed checkpoint (``fused-moe convert``) is opened directly: the
      fused layers are built first and the packed tensors load into them,
      with no repacking.
    * Either way, on the CPU the quantized linears and the embedding then
      run on fused_moe's kernels too, as :func:`fused_moe.patch` does.

    Keyword arguments go to mlx-lm's loading (``tokenizer_config``,
    ``model_config``, ``adapter_path``, ``lazy``, ``return_config``,
    ``revision``, ``trust_remote_code``), as for ``mlx_lm.load``.

    With ``tensor_group`` (an ``mx.distributed.Group``; MiniMax only), the model is sharded
    over the group's ranks as :func:`fused_moe.shard` does (a stock checkpoint
    as mlx-lm's ``sharded_load`` does, then patched); each rank reads only its
    own slice of every expert tensor from the files. Only
    ``tokenizer_config``, ``return_config`` and ``trust_remote_code`` combine
    with it.

    Returns ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with
    ``return_config=True``.
    """
    if unknown := sorted(set(kwargs) - set(LOAD_KWARGS)):
        raise TypeError(
            f"fused_moe.load: unexpected keyword arguments {unknown}; mlx-lm's "
            f"loading takes {list(LOAD_KWARGS)}"
        )
    model_path = _local_path(str(path), kwargs.get("revision"))
    where = f"fused_moe.load({str(path)!r})"
    check_checkpoint(Path(model_path), where)
    config = utils.load_config(Path(model_path))
    config.update(kwargs.get("model_config") or {})
    layers = spec.packed_experts(config, where)

    if tensor_group is not None:
        return _load_sharded(Path(model_path), config, layers, tensor_group, where, kwargs)
    if layers is None:
        loaded = utils.load(str(model_path), **kwargs)
        patch(loaded[0])
        return loaded

    model, config = _load_packed_model(
        Path(model_path), layers, where, kwargs.get("lazy", False),
        model_config=kwargs.get("model_config"),
        trust_remote_code=kwargs.get("trust_remote_code", False),
    )
    if kwargs.get("adapter_path") is not None:
        model = utils.load_adapters(model, kwargs["adapter_path"])
        model.eval()
    swap_dense_layers(model)
    tokenizer = utils.load_tokenizer(
        model_path, kwargs.get("tokenizer_config"), eos_token_ids=config.get("eos_token_id")
    )
    if kwargs.get("return_config", False):
        return model, tokenizer, config
    return model, tokenizer
