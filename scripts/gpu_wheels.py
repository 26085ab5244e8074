"""Download the wheels scripts/gpu_check.py needs on the GPU machine into `.whl/` (git-ignored).

The GPU machine reaches no package index, and its image already holds CUDA torch, triton,
transformers and accelerate (the list below, as /work/.library/device/KINDS.md read it on
2026-11-17). So this walks the requirements of lmctl, its `peers` extra (TRL, lm-eval-harness)
and liger-kernel as installed in this virtualenv (the versions constraints.txt pins), stops at
every package the image has, and downloads the rest for CPython 3.12 on manylinux x86_64, one
wheel each, with `--no-deps` (the walk is the dependency resolution; pip cannot resolve for
that machine from here without pulling CUDA torch). peft is carried even though the image has
one, so the version is the pinned one. docs/distributed.md ("On a GPU") has the run command.

    python scripts/gpu_wheels.py [--dest .whl] [--tokenizer DIR]

`--tokenizer DIR` also copies a tokenizer's files (SmolLM2's, from `lmctl models pull
smollm2-135m`) into DEST/tokenizer: the machine has no hub, and gpu_check builds its models from
config around it.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement

LIGER_VERSION = "0.8.5"  # needs torch and triton, both on the image
# What the GPU image holds (KINDS.md, "Python packages already there"); the walk stops here.
ON_DEVICE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers
flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize
hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind
narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp""".split())
CARRY_ANYWAY = {"peft"}
SOURCE_ONLY = {"rouge-score", "sqlitedict", "word2number"}  # on the image, but lmctl's pinned version must be the one that runs
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64"]
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def walk(roots: list[tuple[str, set[str]]]) -> dict[str, str]:
    """name -> installed version of every requirement reachable from `roots` (name, extras)
    for the target machine, not descending into what the image already has."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name, extras = todo.pop()
        key = norm(name)
        if (key in ON_DEVICE and key not in CARRY_ANYWAY) or (key in found and not extras):
            continue
        dist = md.distribution(name)
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = [{**TARGET, "extra": e} for e in (extras or {""})]
            if req.marker is None or any(req.marker.evaluate(env) for env in wanted):
                todo.append((req.name, set(req.extras)))
    found.pop("lmctl", None)  # the working tree travels; it is on PYTHONPATH there
    return found


def download(pins: dict[str, str], dest: Path) -> None:
    """Binary wheels for the target; the few pure-Python packages published only as source
    (lm-eval's rouge-score, sqlitedict, word2number) are built into wheels here, which run anywhere."""
    platform = [arg for p in PLATFORMS for arg in ("--platform", p)]
    wheels = [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in SOURCE_ONLY]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platform, "-d", str(dest), *wheels], check=True)
    built = [f"{n}=={v}" for n, v in sorted(pins.items()) if n in SOURCE_ONLY]
    if built:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dest), *built], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"))
    parser.add_argument("--tokenizer", type=Path, help="a model directory whose tokenizer files to carry too")
    args = parser.parse_args()
    pins = walk([("lmctl", {"peers"})])
    pins["liger-kernel"] = LIGER_VERSION  # not installed here: it needs triton, which a CPU machine lacks
    args.dest.mkdir(parents=True, exist_ok=True)
    download(pins, args.dest)
    if args.tokenizer:
        out = args.dest / "tokenizer"
        out.mkdir(exist_ok=True)
        for f in args.tokenizer.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy2(f, out / f.name)
    size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
    print(f"{len(pins)} wheels, {size / 2**20:.1f} MiB in {args.dest} (the device tool carries 64 MiB at most)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
