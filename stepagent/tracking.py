"""Run logging: ``metrics.jsonl`` in the run directory always, W&B when ``logger=wandb``.

``metrics.jsonl`` is the source of truth; W&B mirrors every row with the same values:

* a row that carries ``cycle`` is plotted against it (``define_metric``: ``eval/*``,
  ``agreement/*``, ``disc/*``, ``dpo/*``, ``ppo/*``, ... use ``cycle`` as their x-axis);
* list values named ``<section>/<series>_by_step`` in such a row (the step-reward curves
  ``step_reward/expert_by_step``, ``step_reward/agent_by_step``, the agreement by step)
  are logged as they are and, as the UI cannot chart a list, per section also as a table
  ``<section>/cycle_<k>_values`` (step_index, series...) and a line chart
  ``<section>/cycle_<k>`` of the series against the step index;
* tables (``log_table``) go to W&B only: their rows are in the run directory's JSON files.

W&B runs offline (files under ``<run_dir>/wandb``) when no API key is set, so nothing
is lost on machines without network; ``wandb sync`` uploads them later, and
``read_offline_run`` reads them back here (what the W&B UI will show).
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

# Metric sections logged once per cycle: W&B plots them against ``cycle``, not its own step.
CYCLE_SECTIONS = ("eval", "agreement", "step_reward", "disc", "dpo", "ppo", "rollout", "eto", "contrast", "generation")
BY_STEP = "_by_step"


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


def run_label(cfg: Any) -> str:
    """The run's arm (conf/arm), or ``algo`` / ``algo-reward`` when no arm is set."""
    if cfg.get("arm"):
        return str(cfg.arm)
    algo, reward = cfg.algo.name, cfg.reward.name
    return algo if reward == "none" else f"{algo}-{reward}"


def wandb_identity(cfg: Any, lc: Any) -> Dict[str, Any]:
    """W&B name, group, job type and tags of a run, so the ablation arms sit side by side:
    group = the experiment (the task without one), job type = the arm, name = ``<arm>_s<seed>``.
    ``logger.run_name`` / ``group`` / ``job_type`` replace a default; ``logger.tags`` are added
    to the automatic ``key:value`` tags (``logger.auto_tags=false`` keeps only them)."""
    label = run_label(cfg)
    policy = cfg.policy.kind
    tags = [f"experiment:{cfg.experiment}"] if cfg.get("experiment") else []
    tags += [f"task:{cfg.task.name}", f"arm:{label}", f"algo:{cfg.algo.name}", f"reward:{cfg.reward.name}",
             f"policy:{policy}", f"seed:{cfg.seed}"]
    if policy == "hf":
        tags.append(f"model:{Path(str(cfg.policy.name_or_path).rstrip('/')).name}")
    tags = tags if lc.auto_tags else []
    tags += [t for t in lc.tags if t not in tags]
    return {
        "name": lc.run_name or f"{label}_s{cfg.seed}",
        "group": lc.group or cfg.get("experiment") or cfg.task.name,
        "job_type": lc.job_type or label,
        "tags": [t[:64] for t in tags],  # W&B's limit on a tag
    }


def by_step_curves(row: Dict[str, Any]) -> Dict[str, Dict[str, List[Any]]]:
    """``{section: {series: values by step index}}`` from a row's ``<section>/<series>_by_step`` lists."""
    curves: Dict[str, Dict[str, List[Any]]] = {}
    for k, v in row.items():
        if k.endswith(BY_STEP) and "/" in k and isinstance(v, (list, tuple)) and len(v):
            section, series = k[: -len(BY_STEP)].split("/", 1)
            curves.setdefault(section, {})[series] = list(v)
    return curves


CURVE_TITLES = {"step_reward": "mean step reward", "agreement": "agreement with the expert"}


def curve_media(section: str, cycle: int, series: Dict[str, List[Any]]) -> Dict[str, Any]:
    """One cycle's curves as a W&B table (step_index, series...) and a line chart over the step index."""
    import wandb

    n = max(len(v) for v in series.values())
    rows = [[t] + [v[t] if t < len(v) else None for v in series.values()] for t in range(n)]
    points = {name: [(t, y) for t, y in enumerate(v) if y is not None] for name, v in series.items()}
    points = {name: p for name, p in points.items() if p}
    out: Dict[str, Any] = {f"{section}/cycle_{cycle}_values": wandb.Table(columns=["step_index", *series], data=rows)}
    if points:
        out[f"{section}/cycle_{cycle}"] = wandb.plot.line_series(
            xs=[[t for t, _ in p] for p in points.values()], ys=[[y for _, y in p] for p in points.values()],
            keys=list(points), xname="step index",
            title=f"{CURVE_TITLES.get(section, section)} by step index, cycle {cycle}")
    return out


class RunLogger:
    def __init__(self, run_dir: Path, cfg: Any = None, logger_cfg: Any = None, enabled: bool = True,
                 resume_run_id: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled  # False on non-zero ranks: they write nothing shared
        self.wandb_run = None
        self._metrics_path = self.run_dir / "metrics.jsonl"
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if logger_cfg is not None and logger_cfg.name == "wandb":
            self.wandb_run = self._init_wandb(cfg, logger_cfg, resume_run_id)

    @property
    def run_id(self) -> Optional[str]:
        """The W&B run id (None without W&B): pass it back as ``resume_run_id`` to continue the run."""
        return self.wandb_run.id if self.wandb_run is not None else None

    def _init_wandb(self, cfg: Any, lc: Any, resume_run_id: Optional[str]):
        import wandb
        from omegaconf import OmegaConf

        mode = lc.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        ident = wandb_identity(cfg, lc) if cfg is not None else {
            "name": lc.run_name or self.run_dir.name, "group": lc.group, "job_type": lc.job_type,
            "tags": list(lc.tags)}
        log.info("W&B in %s mode (files under %s/wandb): run %s, group %s", mode, self.run_dir,
                 ident["name"], ident["group"])
        run = wandb.init(
            project=lc.project,
            entity=lc.entity,
            mode=mode,
            dir=str(self.run_dir),
            config=OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None,
            id=resume_run_id,
            resume="allow" if resume_run_id else None,
            **{k: v or None for k, v in ident.items()},
        )
        run.define_metric("cycle")
        for section in CYCLE_SECTIONS:
            run.define_metric(f"{section}/*", step_metric="cycle")
        return run

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in metrics.items()}
        with open(self._metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({**row, "_time": time.time(), **({} if step is None else {"_step": step})}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(self._wandb_row(row), step=step)

    @staticmethod
    def _wandb_row(row: Dict[str, Any]) -> Dict[str, Any]:
        """The same values for W&B (lists too: API readers such as experiments/report.py use
        them), and in a cycle row the by-step lists also as a table + line chart."""
        out = dict(row)
        if row.get("cycle") is None:
            return out
        for section, series in by_step_curves(row).items():
            out.update(curve_media(section, row["cycle"], series))
        return out

    def log_table(self, name: str, columns: List[str], rows: List[List[Any]]) -> None:
        """A table for W&B only (its rows are in the run directory's JSON files)."""
        if not self.enabled or self.wandb_run is None:
            return
        import wandb

        self.wandb_run.log({name: wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- reading W&B back
# An offline run's ``run-<id>.wandb`` is W&B's transaction log: a 7-byte file header
# (":W&B", 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks, each fragment with a
# 7-byte header (CRC-32 over type + data, length, type FULL/FIRST/MIDDLE/LAST); a record is a
# serialized ``wandb_internal_pb2.Record``. wandb >= 0.2x writes it from Go and ships no Python reader.
_LOG_BLOCK, _LOG_HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_log_records(path: Path) -> List[bytes]:
    data = Path(path).read_bytes()
    if data[:7] != struct.pack("<4sHB", b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B transaction log")
    records: List[bytes] = []
    pending, pos = b"", _LOG_HEADER
    while pos + _LOG_HEADER <= len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < _LOG_HEADER:  # zero padding at a block's end
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _LOG_HEADER])
        chunk = data[pos + _LOG_HEADER : pos + _LOG_HEADER + length]
        if kind == 0 or len(chunk) < length:  # preallocated tail or a run cut off mid-write
            break
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += _LOG_HEADER + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
    return records


def _set_items(target: Dict[str, Any], items) -> None:
    """Apply W&B history/config/summary items (a key or a nested key path, a JSON value)."""
    for it in items:
        keys = list(it.nested_key) or [it.key]
        node = target
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = json.loads(it.value_json) if it.value_json else None


def _load_tables(value: Any, files: Path) -> Any:
    """Replace logged table references with the table files' columns and data."""
    if isinstance(value, dict):
        if value.get("_type") == "table-file" and (files / value.get("path", "")).is_file():
            return {**json.loads((files / value["path"]).read_text()), "path": value["path"]}
        return {k: _load_tables(v, files) for k, v in value.items()}
    return value


def find_offline_run(path: Path) -> Path:
    """The ``run-<id>.wandb`` file of a run directory (its latest W&B run), a W&B run folder, or itself."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.name.startswith(("offline-run-", "run-")):
        runs = sorted((path / "wandb").glob("offline-run-*")) + sorted((path / "wandb").glob("run-*"))
        if not runs:
            raise FileNotFoundError(f"no W&B run under {path}/wandb")
        path = max(runs, key=lambda p: p.name.rsplit("-", 2)[1])  # the latest: <kind>-<YYYYMMDD_HHMMSS>-<id>
    (log_file,) = path.glob("run-*.wandb")
    return log_file


def read_offline_run(path: Path, wait_s: float = 0.0) -> Dict[str, Any]:
    """What a W&B run recorded, from its local files (what ``wandb sync`` uploads): the run's
    identity, config, ``define_metric`` settings, history rows (tables loaded from their
    files) and summary.

    ``wait_s``: wait up to this long for the run's ``exit`` record. ``wandb.finish()`` can return
    before W&B's service process has written the whole transaction log (seen once under load: a
    log read at once held no run record yet), so a reader right after a run waits for its end."""
    from google.protobuf.json_format import MessageToDict
    from wandb.proto import wandb_internal_pb2 as pb

    log_file = find_offline_run(path)
    files = log_file.parent / "files"
    deadline = time.monotonic() + wait_s
    while True:
        records = []
        for raw in wandb_log_records(log_file):
            rec = pb.Record()
            rec.ParseFromString(raw)
            records.append(rec)
        if time.monotonic() >= deadline or any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    out: Dict[str, Any] = {"run": {}, "config": {}, "metrics": [], "history": [], "summary": {}}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            r = rec.run
            out["run"] = {"id": r.run_id, "project": r.project, "entity": r.entity, "name": r.display_name,
                          "group": r.run_group, "job_type": r.job_type, "tags": list(r.tags)}
            _set_items(out["config"], r.config.update)
        elif kind == "config":
            _set_items(out["config"], rec.config.update)
        elif kind == "metric":
            out["metrics"].append(MessageToDict(rec.metric, preserving_proto_field_name=True))
        elif kind == "history":
            row: Dict[str, Any] = {}
            _set_items(row, rec.history.item)
            out["history"].append(_load_tables(row, files))
        elif kind == "summary":
            _set_items(out["summary"], rec.summary.update)
    return out
