"""RNG state capture and restore, so that a resumed run draws the same numbers.

Lightning checkpoints carry no RNG state. We store torch (CPU and CUDA),
numpy and Python states of every rank, in types ``torch.load(weights_only=True)``
accepts (tensors, lists, ints), and restore them on the same rank.
"""

from __future__ import annotations

import random
from typing import Any

import torch


def capture() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:
        pass
    return state


def restore(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))


def capture_all_ranks() -> list[dict[str, Any]]:
    """Every rank's state (a collective when torch.distributed is initialised).

    Tensors travel as bytes in the gather: pickling a tensor calls ``torch.save`` on every rank, and a
    rank that is not saving must not write (or be seen to write) a checkpoint.
    """
    mine = capture()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, _to_bytes(mine))
        return [_from_bytes(state) for state in gathered]
    return [mine]


def _to_bytes(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return ("tensor", str(obj.dtype).removeprefix("torch."), list(obj.shape), obj.cpu().numpy().tobytes())
    if isinstance(obj, dict):
        return {k: _to_bytes(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_bytes(v) for v in obj]
    return obj


def _from_bytes(obj: Any) -> Any:
    if isinstance(obj, tuple) and len(obj) == 4 and obj[0] == "tensor":
        _, dtype, shape, data = obj
        return torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype)).reshape(shape).clone()
    if isinstance(obj, dict):
        return {k: _from_bytes(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_bytes(v) for v in obj]
    return obj


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
