"""`lmctl doctor`: what this machine can do, checked rather than assumed."""

from __future__ import annotations

import importlib.metadata as md
import os
import shutil

from pydantic import BaseModel

from lmctl.home import lmctl_home


class DoctorReport(BaseModel):
    ok: bool
    lmctl_home: str
    free_disk_gb: float
    libraries: dict[str, str]
    missing: list[str]
    accelerator: str
    tracking_uri: str
    registry_reachable: bool
    pulled_models: list[str]


def run_checks() -> DoctorReport:
    from lmctl import tracking
    from lmctl.models import CATALOG, pulled_path

    libraries, missing = {}, []
    for pkg in ("torch", "transformers", "peft", "datasets", "accelerate", "mlflow", "fastapi", "uvicorn", "gguf"):
        try:
            libraries[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            missing.append(pkg)
    import torch

    accelerator = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    try:
        tracking.client().search_experiments(max_results=1)
        reachable = True
    except Exception:  # noqa: BLE001 - doctor reports, it does not fail
        reachable = False
    home = lmctl_home()
    return DoctorReport(
        ok=not missing and reachable, lmctl_home=str(home),
        free_disk_gb=round(shutil.disk_usage(home).free / 1e9, 1), libraries=libraries, missing=missing,
        accelerator=accelerator, tracking_uri=tracking.tracking_uri(), registry_reachable=reachable,
        pulled_models=[name for name in CATALOG if pulled_path(name)],
    )
