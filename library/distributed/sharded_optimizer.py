"""An optimizer's state saved as each rank holds it (FSDP2: the local shards of DTensor states), without pickle.

Each rank writes `optimizer_rank{r}_of_{n}.safetensors`: its state tensors (a DTensor's local shard) under
`{param index}.{state key}`, and in the file's metadata a JSON of the rest: the parameter groups (hyperparameters,
parameter indices) and, per state entry, whether it is a tensor (and a DTensor) or a plain value. Loading rebuilds
each DTensor from the local shard with the matching parameter's mesh and placements, so a resumed run needs the
same number of processes (checked before anything is loaded: `check_saved`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from library.distributed.engine import EngineError

LAYOUT = "optimizer_shards.json"  # written by the main process: how many ranks saved shards


def shard_name(rank: int, world: int) -> str:
    return f"optimizer_rank{rank}_of_{world}.safetensors"


def _params(optimizer) -> list[torch.Tensor]:
    """The parameters in the order torch's state_dict numbers them."""
    return [p for g in optimizer.param_groups for p in g["params"]]


def _json_value(value, where: str):
    try:
        json.dumps(value)
    except TypeError:
        raise EngineError(f"the optimizer's {where} ({type(value).__name__}) cannot be saved in a sharded state; "
                          "use a torch optimizer (AdamW, Adafactor, Lion, SGD) with FSDP2") from None
    return value


def save_sharded(optimizer, folder: Path, rank: int, world: int) -> None:
    """This rank's optimizer state into `folder` (every rank calls it; the main process also writes LAYOUT)."""
    state = optimizer.state_dict()
    tensors, entries = {}, {}
    for index, values in state["state"].items():
        entry = {}
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if isinstance(value, DTensor) else value
                tensors[f"{index}.{key}"] = local.detach().to("cpu").contiguous()
                entry[key] = {"tensor": isinstance(value, DTensor)}
            else:
                entry[key] = {"value": _json_value(value, f"state {key!r}")}
        entries[str(index)] = entry
    groups = [{k: _json_value(v, f"parameter group setting {k!r}") for k, v in g.items()}
              for g in state["param_groups"]]
    structure = {"rank": rank, "world_size": world, "param_groups": groups, "state": entries}
    save_file(tensors, str(folder / shard_name(rank, world)), {"structure": json.dumps(structure)})
    if rank == 0:
        (folder / LAYOUT).write_text(json.dumps({"world_size": world, "files": [shard_name(r, world)
                                                                              for r in range(world)]}))


def check_saved(folder: Path, rank: int, world: int) -> None:
    """Refuse a state this run cannot load (before anything is loaded), in one line."""
    layout = folder / LAYOUT
    if not layout.exists():
        raise EngineError(f"--resume {folder}: no {LAYOUT}; it was not saved by an FSDP2 run: resume it with the "
                          "engine that saved it (same accelerate config)")
    try:
        saved = int(json.loads(layout.read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EngineError(f"{layout}: damaged ({e}); resume from another state") from None
    if saved != world:
        raise EngineError(f"--resume {folder}: its optimizer state is sharded over {saved} processes, this run has "
                          f"{world}; resume with --num_processes {saved} (the same accelerate config)")
    path = folder / shard_name(rank, world)
    try:
        with safe_open(str(path), "pt") as f:
            json.loads(f.metadata()["structure"])
    except Exception as e:  # missing, cut off, foreign: safetensors raises its own error types
        raise EngineError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:200]}); resume from another "
                          "state") from None


def load_sharded(optimizer, folder: Path, rank: int, world: int) -> None:
    """What save_sharded wrote for this rank, into `optimizer` (its DTensor states on the parameters' meshes)."""
    path = folder / shard_name(rank, world)
    with safe_open(str(path), "pt") as f:
        structure = json.loads(f.metadata()["structure"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    params = _params(optimizer)
    state = {}
    for index, entry in structure["state"].items():
        param = params[int(index)]
        values = {}
        for key, how in entry.items():
            if "value" in how:
                values[key] = how["value"]
                continue
            local = tensors[f"{index}.{key}"]
            if how["tensor"]:
                local = DTensor.from_local(local.to(param.device), param.device_mesh, param.placements,
                                           shape=param.shape, stride=param.stride(), run_check=False)
            values[key] = local
        state[int(index)] = values
    optimizer.load_state_dict({"state": state, "param_groups": structure["param_groups"]})
