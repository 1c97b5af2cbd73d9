"""Run logging: ``metrics.jsonl`` in the run directory always, W&B when ``logger=wandb``.

W&B runs offline (files under ``<run_dir>/wandb``) when no API key is set, so
nothing is lost on machines without network; ``wandb sync`` uploads them later.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    return v


class RunLogger:
    def __init__(self, run_dir: Path, cfg: Any = None, logger_cfg: Any = None, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled  # False on non-zero ranks: they write nothing shared
        self.wandb_run = None
        self._metrics_path = self.run_dir / "metrics.jsonl"
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if logger_cfg is not None and logger_cfg.name == "wandb":
            self.wandb_run = self._init_wandb(cfg, logger_cfg)

    def _init_wandb(self, cfg: Any, lc: Any):
        import wandb
        from omegaconf import OmegaConf

        mode = lc.mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        log.info("W&B in %s mode (files under %s/wandb)", mode, self.run_dir)
        return wandb.init(
            project=lc.project,
            entity=lc.entity,
            group=lc.group,
            tags=list(lc.tags) or None,
            mode=mode,
            dir=str(self.run_dir),
            config=OmegaConf.to_container(cfg, resolve=True) if cfg is not None else None,
            name=self.run_dir.name,
        )

    def log(self, metrics: Dict[str, Any], step: Optional[int] = None) -> None:
        if not self.enabled:
            return
        row = {k: _jsonable(v) for k, v in metrics.items()}
        row["_time"] = time.time()
        if step is not None:
            row["_step"] = step
        with open(self._metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items()}, step=step)

    def log_table(self, name: str, columns: List[str], rows: List[List[Any]]) -> None:
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
