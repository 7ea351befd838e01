"""Resumable calibration: every finished block is persisted to a work folder.

Layout of the folder::

    manifest.json            the commit point: fingerprint, finished blocks, budget, reports
    block_00003.pt           codes and scales of block 3's Linears (tensors only)
    caches_00003.pt          both activation caches after block 3 (input of block 4)

A block is committed by writing its files under temporary names, renaming them, and then
replacing ``manifest.json`` (write to a temporary file, ``os.replace``): a run killed at any point
leaves either the old or the new manifest, and every file the manifest names is complete. The
caches of older blocks are deleted only after the new manifest is in place.

The fingerprint covers the model's config and class, the quantization settings and the bytes of
the first block's inputs (hence the calibration data and tokenizer); a folder with another
fingerprint is refused with an error rather than silently mixed in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import shutil
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .observers import LayerReport

logger = logging.getLogger("watersic_hf.integration.calibrate")

__all__ = ["BlockStore", "ResumeState", "StoredWeight", "fingerprint", "default_work_dir"]

MANIFEST = "manifest.json"
_VERSION = 1
#: Config fields that do not change the result (or are filled in by calibration).
_NOT_IN_FINGERPRINT = ("resume", "work_dir", "layers", "achieved_bits", "calibration_tokens",
                       "report", "watersic_version", "backend", "device")


@dataclass
class StoredWeight:
    """What ``WaterSICLinear.from_quantized`` needs from a quantized weight."""

    codes: torch.Tensor
    col_scale: torch.Tensor
    row_scale: torch.Tensor
    dead_columns: torch.Tensor
    group_scale: torch.Tensor | None = None  # standard GPTQ: (out, ceil(in / group_size))
    group_size: int = 0


@dataclass
class ResumeState:
    """A work folder's committed progress."""

    finished: int  # blocks 0 .. finished-1 are done
    used_bits: float
    done_weights: int
    reports: list[LayerReport] = field(default_factory=list)
    weights: dict[int, dict[str, StoredWeight]] = field(default_factory=dict)
    fcache: list[torch.Tensor] | None = None
    qcache: list[torch.Tensor] = field(default_factory=list)


def fingerprint(model: torch.nn.Module, config: Any, skip: list[str],
                first_inputs: list[torch.Tensor]) -> str:
    """SHA-256 over what determines the result: model config, settings, calibration inputs."""
    h = hashlib.sha256()
    model_cfg = getattr(model, "config", None)
    h.update(type(model).__name__.encode())
    if model_cfg is not None and hasattr(model_cfg, "to_json_string"):
        h.update(model_cfg.to_json_string(use_diff=False).encode())
    settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(skip)).encode())
    for t in first_inputs:
        h.update(str((tuple(t.shape), t.dtype)).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def default_work_dir(fp: str) -> pathlib.Path:
    """``$WATERSIC_CACHE/resume/<fingerprint[:16]>`` (``~/.cache/watersic_hf`` by default)."""
    root = os.environ.get("WATERSIC_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "watersic_hf"
    )
    return pathlib.Path(root) / "resume" / fp[:16]


def _save_tensors(obj: dict[str, Any], path: pathlib.Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _group_fields(q: Any) -> dict[str, Any]:
    """The group scales of a grouped weight (standard GPTQ), or nothing."""
    group = getattr(q, "group_scale", None)
    if group is None:
        return {}
    return {"group_scale": group.detach().cpu(), "group_size": int(q.group_size)}


class BlockStore:
    """The work folder of one resumable calibration.

    Args:
        folder (`str` or `Path`): the work folder (created if missing).
        fp (`str`): the run's :func:`fingerprint`.
    """

    def __init__(self, folder: str | os.PathLike[str], fp: str) -> None:
        self.folder = pathlib.Path(folder)
        self.fp = fp

    # ------------------------------------------------------------------ reading
    def load(self) -> ResumeState | None:
        """The committed progress, or None when the folder holds none."""
        path = self.folder / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"the resume manifest {path} is unreadable ({err}); delete {self.folder} to start "
                "over"
            ) from err
        if manifest.get("version") != _VERSION or manifest.get("fingerprint") != self.fp:
            raise ValueError(
                f"the resume folder {self.folder} belongs to another model, calibration data or "
                "settings (fingerprint mismatch); delete it, or pass another work_dir"
            )
        finished = int(manifest["finished"])
        weights: dict[int, dict[str, StoredWeight]] = {}
        for idx in range(finished):
            data = torch.load(self.folder / f"block_{idx:05d}.pt", weights_only=True)
            weights[idx] = {rel: StoredWeight(**t) for rel, t in data.items()}
        caches: dict[str, Any] = {"fcache": None, "qcache": []}
        if manifest.get("caches"):
            caches = torch.load(self.folder / manifest["caches"], weights_only=True)
        return ResumeState(
            finished=finished,
            used_bits=float(manifest["used_bits"]),
            done_weights=int(manifest["done_weights"]),
            reports=[LayerReport(**r) for r in manifest["reports"]],
            weights=weights,
            fcache=caches["fcache"],
            qcache=caches["qcache"],
        )

    # ------------------------------------------------------------------ writing
    def commit(self, idx: int, quantized: dict[str, Any], reports: list[LayerReport],
               used_bits: float, done_weights: int, fcache: list[torch.Tensor] | None,
               qcache: list[torch.Tensor]) -> None:
        """Persist finished block ``idx`` (and the caches that feed block ``idx + 1``)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _save_tensors(
            {
                rel: {
                    "codes": q.codes.detach().cpu(),
                    "col_scale": q.col_scale.detach().cpu(),
                    "row_scale": q.row_scale.detach().cpu(),
                    "dead_columns": q.dead_columns.detach().cpu(),
                    **_group_fields(q),
                }
                for rel, q in quantized.items()
            },
            self.folder / f"block_{idx:05d}.pt",
        )
        caches_name = None
        if qcache:
            caches_name = f"caches_{idx:05d}.pt"
            _save_tensors({"fcache": fcache, "qcache": qcache}, self.folder / caches_name)
        manifest = {
            "version": _VERSION,
            "fingerprint": self.fp,
            "finished": idx + 1,
            "used_bits": used_bits,  # floats round-trip exactly through JSON (repr)
            "done_weights": done_weights,
            "reports": [asdict(r) for r in reports],
            "caches": caches_name,
        }
        tmp = self.folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest), encoding="utf-8")
        os.replace(tmp, self.folder / MANIFEST)
        for old in self.folder.glob("caches_*.pt"):
            if old.name != caches_name:
                old.unlink()

    def remove(self) -> None:
        """Delete the folder (calibration finished)."""
        shutil.rmtree(self.folder, ignore_errors=True)
