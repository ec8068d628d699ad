"""A suite task as evaluation sees it: frozen head, logit scale, images and labels per split."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.errors import InputError
from pipeline.io.safetensors_io import SafetensorsFile


@dataclass
class TaskData:
    name: str
    classes: tuple[str, ...]
    head: torch.Tensor  # (num_classes, projection_dim), rows L2-normalised
    logit_scale: float
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def load_task(tasks_dir: str, task: str, splits=("train", "val", "test")) -> TaskData:
    path = os.path.join(tasks_dir, f"{task}.safetensors")
    if not os.path.isfile(path):
        known = sorted(f[:-12] for f in os.listdir(tasks_dir) if f.endswith(".safetensors")) \
            if os.path.isdir(tasks_dir) else []
        raise InputError(f"{path}: no such task; this suite has: {', '.join(known) or 'none'}")
    with SafetensorsFile(path) as f:
        data = TaskData(task, tuple(json.loads(f.metadata["classes"])), f.read("head"),
                        float(f.metadata["logit_scale"]))
        for split in splits:
            data.splits[split] = (f.read(f"{split}.images").numpy(),
                                  f.read(f"{split}.labels").numpy())
    return data
