"""The exported model: one plain-torch file (state_dict + config + label schema + model id).

Loaded with `torch.load(..., weights_only=True)`: the file holds only tensors and plain
dicts / lists / strings / numbers, never pickled objects.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .errors import InputError
from .io import atomic_write
from .labels import LabelSchema
from .network import MultitaskNet, NetConfig

FORMAT = "tumornet-model-v1"


def model_id(state_dict: dict) -> str:
    """Content hash of the weights (sha256 over sorted names and raw bytes), 16 hex chars."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def export_model(model: MultitaskNet, path: str | Path, *, extra: dict | None = None) -> str:
    """Write the model file; returns its model id."""
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    mid = model_id(sd)
    cfg = {f: getattr(model.cfg, f) for f in model.cfg.__dataclass_fields__}
    payload = {"format": FORMAT, "state_dict": sd, "model_config": cfg, "tasks": model.schema.to_dict(),
               "model_id": mid, "extra": json.loads(json.dumps(extra or {}, default=float))}  # plain types only
    atomic_write(path, lambda tmp: torch.save(payload, tmp))
    return mid


def load_model(path: str | Path, map_location="cpu") -> tuple[MultitaskNet, dict]:
    """-> (model in eval mode, metadata: model_id, tasks, model_config, extra)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: model file not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: not a loadable model file ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise InputError(f"{path}: not a {FORMAT} file")
    model = MultitaskNet(NetConfig(**payload["model_config"]), LabelSchema.from_dict(payload["tasks"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    if model_id(model.state_dict()) != payload["model_id"]:
        raise InputError(f"{path}: weights do not match the recorded model id (corrupt file?)")
    return model, {k: payload[k] for k in ("model_id", "tasks", "model_config", "extra")}


def retuned_recipe(path: str | Path, overrides: list[str], *, search_only: bool = True) -> tuple[dict, dict]:
    """A model file's payload and its retrieval config section with `retrieval.<key>=<value>` overrides
    applied and checked -> (payload, retrieval section). `search_only`: only keys of
    tumornet.recipe.SEARCH_ONLY may change (rerank, rerank_size, rerank_position, refine_box, drawn_size,
    drawn_read: the stored vectors stay the same); otherwise any retrieval key (the caller fits the statistics
    again)."""
    from dataclasses import fields

    from .config import apply_overrides
    from .recipe import SEARCH_ONLY, RetrievalConfig

    load_model(path)  # the file is a valid model
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    config = payload["extra"].setdefault("config", {})
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith("retrieval."):
            raise InputError(f"--set {item!r}: only retrieval.KEY can change in a trained model (other keys "
                             "change the weights: train again)")
        known = sorted(f.name for f in fields(RetrievalConfig))
        if key.removeprefix("retrieval.") not in known:
            raise InputError(f"--set {item!r}: unknown retrieval key (expected one of {', '.join(known)})")
        if search_only and key.removeprefix("retrieval.") not in SEARCH_ONLY:
            raise InputError(f"--set {item!r}: without --manifest only the search-time keys retrieval."
                             f"{{{', '.join(SEARCH_ONLY)}}} can change (other keys change the stored vectors: give "
                             "the training manifest to fit the recipe's statistics again)")
    if not overrides:
        raise InputError("retune: give at least one --set retrieval.KEY=VALUE")
    retrieval = apply_overrides({"retrieval": dict(config.get("retrieval") or {})}, overrides)["retrieval"]
    RetrievalConfig(**retrieval)  # checked as at training
    return payload, retrieval


def with_search_settings(path: str | Path, out: str | Path, overrides: list[str]) -> str:
    """A copy of a model file with search-time retrieval keys changed (retuned_recipe): the weights, the
    model id and the stored vectors stay the same, so an archive embedded with the model needs no new
    embedding -> the model id. Any other key is refused here (trainer.loop.with_recipe fits it)."""
    payload, retrieval = retuned_recipe(path, overrides)
    payload["extra"]["config"]["retrieval"] = retrieval
    atomic_write(out, lambda tmp: torch.save(payload, tmp))
    return payload["model_id"]
