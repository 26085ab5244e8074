"""`lmctl deploy`: local bundle (really served), vLLM arguments (checked against vLLM 0.33's real
`vllm serve` parser, transcribed by scripts/vllm_reference.py), Kubernetes manifests (checked
structurally here, by kubernetes-validate and the Gateway API schema in test_deploy_validators.py),
and refusals that leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from conftest import ASSETS, free_port
from http_wait import wait_for_http

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def documented_vllm_flags() -> tuple[set[str], list[int]]:
    """Flags and --max-lora-rank choices of vLLM 0.33's parser (tests/assets, see scripts/vllm_reference.py)."""
    flags, ranks = set(), []
    text = (ASSETS / "vllm_serve_flags.txt").read_text()
    assert "from vLLM 0.33.0" in text.splitlines()[0]
    for line in text.splitlines():
        if line.startswith("# choices --max-lora-rank:"):
            ranks = [int(x) for x in line.split(":", 1)[1].split()]
        elif line.startswith("--"):
            flags.add(line.strip())
    assert len(flags) > 40 and ranks, "asset unreadable"
    return flags, ranks


@pytest.fixture(scope="module")
def checkpoint(sealed_checkpoint: Path) -> Path:
    """The session's trained tiny adapter, shared by this module's tests read-only."""
    return sealed_checkpoint


def resealed_copy(src: Path, dest: Path, **adapter_changes: Any) -> Path:
    """A copy whose adapter_config.json is changed and whose lock is rewritten by lmctl's own seal."""
    from lmctl import checkpoint as ck

    shutil.copytree(src, dest)
    cfg = json.loads((dest / "adapter_config.json").read_text())
    (dest / "adapter_config.json").write_text(json.dumps({**cfg, **adapter_changes}))
    manifest = ck.read_manifest(dest)
    (dest / ck.MANIFEST).unlink()
    ck.seal(dest, manifest.model_dump(exclude={"files"}))
    return dest


# ---------------------------------------------------------------- local


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_local_bundle_starts_and_answers_healthz(cli, checkpoint: Path, tmp_path: Path, started) -> None:
    from lmctl import checkpoint as ck

    out = tmp_path / "bundle"
    result = cli("deploy", checkpoint, "--target", "local", "--out", out, "--port", "9", "--json")
    assert result.code == 0, result.err
    data = result.json
    assert {"deploy.json", "start.sh", "model/lmctl.json", "model/adapter_model.safetensors",
            "model/tokenizer.json"} <= set(data["files"])
    assert ck.verify(out / "model").tokenizer.fingerprint == ck.read_manifest(checkpoint).tokenizer.fingerprint
    manifest = json.loads((out / "deploy.json").read_text())
    assert manifest["manifest_sha256"] == ck.sha256_file(checkpoint / "lmctl.json") == data["manifest_sha256"]
    assert manifest["base_model"]["copied"] is False and manifest["base_model"]["config_sha256"]
    assert manifest["tokenizer_fingerprint"] and manifest["lmctl_version"] and manifest["created_at"]
    assert manifest["serve"]["argv"][:3] == ["lmctl", "serve", str(out / "model")]
    script = (out / "start.sh").read_text()
    assert (out / "start.sh").stat().st_mode & stat.S_IXUSR
    assert "set -euo pipefail" in script and re.search(r"^exec .* serve ", script, re.M)

    # move the bundle: start.sh finds its model next to itself; host/port come from the env
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the venv's lmctl
           "LMCTL_PORT": str(port), "LMCTL_HOST": "127.0.0.1"}
    log = tmp_path / "start.log"
    proc = subprocess.Popen([str(moved / "start.sh")], env=env, cwd=tmp_path, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    started.append(proc)
    wait_for_http(f"http://127.0.0.1:{port}/healthz", timeout=180, proc=proc, log=log)
    body = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).text
    assert manifest["tokenizer_fingerprint"] in body  # it serves the locked checkpoint, not something else
    # the alert rules select the model label this server really reports
    assert manifest["alerts"]["model"] == "model" and "alerts.rules.yaml" in data["files"]
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
    requests = next(f for f in families if f.name == "lmctl_requests")
    assert {sample.labels["model"] for sample in requests.samples} == {"model"}
    rules = yaml.safe_load((moved / "alerts.rules.yaml").read_text())
    quota = next(r for g in rules["groups"] for r in g["rules"] if r["alert"] == "LmctlQuotaExhausted")
    served = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).json()
    assert (quota["labels"]["model"], quota["labels"]["version"]) == ("model", served["version"])
    assert 'model="model"' in rules["groups"][0]["rules"][0]["expr"]
    if shutil.which("promtool"):
        checked = subprocess.run(["promtool", "check", "rules", str(moved / "alerts.rules.yaml")],
                                 capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_refusals_write_nothing(cli, checkpoint: Path, tiny_base: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    refused = cli("deploy", checkpoint, "--target", "local", "--out", out)
    assert refused.code == 2 and "not empty" in refused.err and (out / "keep").exists()
    assert cli("deploy", checkpoint, "--target", "local", "--out", out, "--force").code == 0
    assert not (out / "keep").exists() and (out / "start.sh").is_file()

    assert cli("deploy", tiny_base, "--target", "local", "--out", tmp_path / "p").code == 2  # not a checkpoint
    assert cli("deploy", checkpoint, "--target", "docker", "--out", tmp_path / "q").code == 2
    bad = cli("deploy", checkpoint, "--target", "vllm", "--out", tmp_path / "r", "--canary", "models:/x/1")
    assert bad.code == 2 and "kubernetes only" in bad.err
    for extra, complaint in ((["--max-replicas", "3"], "kubernetes only"), (["--slo", str(tmp_path / "s.yaml")], "--slo")):
        refused = cli("deploy", checkpoint, "--target", "vllm", "--out", tmp_path / "r", *extra)
        assert refused.code == 2 and complaint in refused.err, refused.err
    slo = tmp_path / "slo.yaml"
    slo.write_text("availability: 0.999\nperiod: 1w\n")
    assert cli("deploy", checkpoint, "--target", "local", "--out", tmp_path / "slo", "--slo", slo).code == 0
    assert ") > 0.00336\n" in (tmp_path / "slo" / "alerts.rules.yaml").read_text()  # 2% of a week in 1h: 3.36 x 0.1%

    tampered = tmp_path / "tampered"
    shutil.copytree(checkpoint, tampered)
    weights = tampered / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    result = cli("deploy", tampered, "--target", "local", "--out", tmp_path / "t")
    assert result.code == 4 and "sha256 mismatch" in result.err and "Traceback" not in result.err
    assert not (tmp_path / "t").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # no staging left over


# ---------------------------------------------------------------- vllm


def _argv_through_bash(script: Path, tmp_path: Path, api_key: str | None) -> subprocess.CompletedProcess[str]:
    """Run the generated vllm.sh with a `vllm` on PATH that records the argv bash hands it."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "vllm"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_OUT"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", ARGV_OUT=str(tmp_path / "argv.txt"))
    if api_key is not None:
        env["VLLM_API_KEY"] = api_key
    return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)


def test_vllm_arguments_are_documented_flags(cli, checkpoint: Path, tmp_path: Path) -> None:
    flags, ranks = documented_vllm_flags()
    out = tmp_path / "vllm"
    result = cli("deploy", checkpoint, "--target", "vllm", "--out", out, "--port", "8011", "--json")
    assert result.code == 0, result.err
    refused = _argv_through_bash(out / "vllm.sh", tmp_path, api_key=None)
    assert refused.returncode != 0 and "VLLM_API_KEY" in refused.stderr  # no key, no server
    ran = _argv_through_bash(out / "vllm.sh", tmp_path, api_key="sekrit")
    assert ran.returncode == 0, ran.stderr
    argv = (tmp_path / "argv.txt").read_text().splitlines()
    assert "sekrit" not in argv  # the key stays in the environment, out of `ps`

    assert argv[0] == "serve" and not argv[1].startswith("--")
    emitted = [a for a in argv[2:] if a.startswith("--")]
    assert emitted and set(emitted) <= flags, set(emitted) - flags
    opts = {a: argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
            for i, a in enumerate(argv) if a.startswith("--")}
    r = json.loads((checkpoint / "adapter_config.json").read_text())["r"]
    assert int(opts["--max-lora-rank"]) in ranks and int(opts["--max-lora-rank"]) >= r
    assert int(opts["--max-lora-rank"]) == min(x for x in ranks if x >= r)
    assert opts["--enable-lora"] is True and opts["--port"] == "8011"
    name, adapter = opts["--lora-modules"].split("=", 1)
    assert name == "tiny" and Path(adapter) == out / "adapter"
    assert (Path(adapter) / "adapter_config.json").is_file() and (Path(adapter) / "adapter_model.safetensors").is_file()
    for tokenizer_file in ("tokenizer.json", "tokenizer_config.json"):  # the locked tokenizer, byte for byte
        assert (Path(opts["--tokenizer"]) / tokenizer_file).read_bytes() == (checkpoint / tokenizer_file).read_bytes()
    assert Path(opts["--chat-template"]).read_bytes() == (checkpoint / "chat_template.jinja").read_bytes()
    assert opts["--served-model-name"] != name  # the base and the adapter are distinct model ids

    config_text = (out / "vllm-config.yaml").read_text()
    config = yaml.safe_load(config_text)
    assert {f"--{key}" for key in config} <= flags
    assert config["model"] == argv[1] and config["max-lora-rank"] == int(opts["--max-lora-rank"])
    assert config["lora-modules"] == [f"tiny={out / 'adapter'}"] and config["enable-lora"] is True
    assert "api-key" not in config and "sekrit" not in config_text
    assert json.loads((out / "deploy.json").read_text())["vllm"]["max_lora_rank"] == int(opts["--max-lora-rank"])


def test_vllm_refuses_what_it_cannot_serve(cli, checkpoint: Path, tmp_path: Path) -> None:
    from lmctl.deploy.vllm import max_lora_rank, unsupported_features

    dora = resealed_copy(checkpoint, tmp_path / "dora", use_dora=True)
    assert cli("deploy", dora, "--target", "local", "--out", tmp_path / "dl").code == 0  # lmctl serves DoRA
    result = cli("deploy", dora, "--target", "vllm", "--out", tmp_path / "dv")
    assert result.code == 2 and "DoRA" in result.err and not (tmp_path / "dv").exists()
    saved = resealed_copy(checkpoint, tmp_path / "mts", modules_to_save=["lm_head"])
    assert cli("deploy", saved, "--target", "vllm", "--out", tmp_path / "mv").code == 2

    base = {"peft_type": "LORA", "r": 8, "bias": "none"}
    assert unsupported_features(base, added_tokens=False) == []
    assert unsupported_features({**base, "trainable_token_indices": [400, 401]}, added_tokens=False)
    assert unsupported_features(base, added_tokens=True)
    assert [max_lora_rank(r) for r in (1, 4, 8, 9, 300, 512)] == [1, 8, 8, 16, 320, 512]
    from lmctl.errors import BadInputError

    with pytest.raises(BadInputError):
        max_lora_rank(513)


def test_vllm_refuses_a_base_it_serves_without_lora(cli, tiny_base: Path, tmp_path: Path) -> None:
    """A real adapter on a real GPT-2 base: vLLM 0.33 cannot start it (`GPT2LMHeadModel does not
    support LoRA yet`), so lmctl refuses at deploy time, naming the architecture."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lmctl.deploy.vllm import lora_architectures

    assert {"LlamaForCausalLM", "Qwen2ForCausalLM"} <= lora_architectures()
    assert "GPT2LMHeadModel" not in lora_architectures()
    tok = AutoTokenizer.from_pretrained(tiny_base)
    base = tmp_path / "gpt2-base"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4, n_positions=128,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = {"model": {"base": str(base)}, "data": {"train": str(ASSETS / "tiny_train.jsonl"), "max_length": 32},
           "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["c_attn"]},
           "train": {"max_steps": 1, "batch_size": 4, "save_every": 1, "eval_every": 1},
           "output": {"dir": str(tmp_path / "runs"), "run_name": "gpt2"}}
    (tmp_path / "gpt2.yaml").write_text(yaml.safe_dump(cfg))
    trained = cli("train", tmp_path / "gpt2.yaml", "--json")
    assert trained.code == 0, trained.err
    result = cli("deploy", trained.json["checkpoint"], "--target", "vllm", "--out", tmp_path / "v")
    assert result.code == 2 and "GPT2LMHeadModel" in result.err and "LoRA" in result.err
    assert not (tmp_path / "v").exists()
    assert cli("deploy", trained.json["checkpoint"], "--target", "local", "--out", tmp_path / "l").code == 0


# ---------------------------------------------------------------- kubernetes


def test_lora_list_source_reader_follows_bases_imports_and_platforms(tmp_path: Path) -> None:
    """scripts/vllm_reference.py settles a class that cannot be imported from vLLM's source: bases
    followed through imports to `supports_lora`, an own `supports_lora = False` first, per-platform
    implementations that differ refused, and a disagreement with the registry's answer fatal."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vllm_reference", Path(__file__).parent.parent / "scripts" / "vllm_reference.py")
    ref = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(ref)  # type: ignore[union-attr]
    files = {
        "vllm/model_executor/models/registry.py":
            '_TEXT_GENERATION_MODELS = {"A": ("a", "A"), "C": ("a", "C"), "B": ("vllm.models.b", "B")}',
        "vllm/model_executor/models/interfaces.py": "class SupportsLoRA(Protocol):\n    supports_lora: ClassVar = True",
        "vllm/model_executor/models/a.py": "from torch import nn\nfrom .interfaces import SupportsLoRA as Lora\n"
                                           "class Base(nn.Module, Lora): pass\nclass A(Base): pass\n"
                                           "class C(Base):\n    supports_lora = False",
        "vllm/models/b/__init__.py": "if rocm():\n    from .amd.model import B\nelse:\n    from .nvidia.model import B",
        "vllm/models/b/nvidia/model.py": "from vllm.model_executor.models.interfaces import SupportsLoRA\nclass B(SupportsLoRA): pass",
        "vllm/models/b/amd/model.py": "class B: pass",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    reader = ref.SourceReader(tmp_path)
    made = ref.lora_file("0.0", {"A": "ImportError: no torchvision", "B": True, "C": False}, reader)
    assert [line for line in made.splitlines() if not line.startswith("#")] == ["A"]
    assert "# 1 capable; without LoRA: B, C" in made
    assert "settled from the source (capable; the import failed: ImportError: no torchvision): A" in made
    assert "LoRA on some platforms only: B (amd: no, nvidia: yes)" in made
    with pytest.raises(SystemExit, match="C: the source reads"):
        ref.lora_file("0.0", {"A": True, "B": False, "C": True}, reader)


def _check_object(doc: dict[str, Any], kind: str, api_version: str) -> None:
    assert doc["kind"] == kind and doc["apiVersion"] == api_version
    assert DNS1123.match(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63
    for key, value in doc["metadata"].get("labels", {}).items():
        assert re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", value), (key, value)


def _check_deployment(doc: dict[str, Any], namespace: str) -> dict[str, Any]:
    _check_object(doc, "Deployment", "apps/v1")
    assert doc["metadata"]["namespace"] == namespace
    selector = doc["spec"]["selector"]["matchLabels"]
    pod_labels = doc["spec"]["template"]["metadata"]["labels"]
    assert selector and selector.items() <= pod_labels.items()
    (container,) = doc["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["args"][0] == "serve" and container["args"][1].startswith("models:/")
    assert container["args"][container["args"].index("--port") + 1] == str(port["containerPort"])
    assert container["args"][container["args"].index("--host") + 1] == "0.0.0.0"
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"] and container["resources"]["limits"]["memory"]
    (keys,) = [e for e in container["env"] if e["name"] == "LMCTL_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"]["name"] and "value" not in keys
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert mounts <= {v["name"] for v in doc["spec"]["template"]["spec"]["volumes"]}
    return container


def _check_service(svc: dict[str, Any], deployment: dict[str, Any], other: dict[str, Any] | None) -> None:
    _check_object(svc, "Service", "v1")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    if other is not None:  # a stable Service must not also select canary pods (and vice versa)
        assert not svc["spec"]["selector"].items() <= other["spec"]["template"]["metadata"]["labels"].items()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = container["ports"]
    assert svc["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])


def test_kubernetes_manifests_with_weighted_canary(cli, checkpoint: Path, tmp_path: Path) -> None:
    for alias in ("production", None):
        args = ["register", checkpoint, "--name", "Tiny_Model.v2", "--json"] + (["--alias", alias] if alias else [])
        assert cli(*args).code == 0
    out = tmp_path / "k8s"
    result = cli("deploy", "models:/Tiny_Model.v2@production", "--target", "kubernetes", "--out", out,
                 "--canary", "models:/Tiny_Model.v2/2", "--canary-weight", "0.2", "--cpu", "500m", "--memory", "1Gi",
                 "--gpus", "1", "--replicas", "3", "--namespace", "ml", "--image", "registry.example/lmctl:1",
                 "--tracking-uri", "http://mlflow.ml:5000", "--json")
    assert result.code == 0, result.err
    assert result.json["registry_version"] == "1"
    docs = {p.name: yaml.safe_load(p.read_text()) for p in out.glob("*.yaml")}
    kustomization = docs.pop("kustomization.yaml")
    rules, operator_rule = docs.pop("alerts.rules.yaml"), docs.pop("prometheusrule.yaml")  # applied on their own
    assert kustomization["kind"] == "Kustomization" and sorted(kustomization["resources"]) == sorted(docs)
    assert kustomization["namespace"] == "ml"
    assert operator_rule["spec"]["groups"] == rules["groups"] and operator_rule["metadata"]["namespace"] == "ml"
    assert 'model="Tiny_Model.v2"' in rules["groups"][0]["rules"][0]["expr"]  # the name serve reports

    stable, canary = docs["deployment.yaml"], docs["deployment-canary.yaml"]
    container = _check_deployment(stable, "ml")
    canary_container = _check_deployment(canary, "ml")
    assert stable["metadata"]["name"] == "tiny-model-v2" and canary["metadata"]["name"] == "tiny-model-v2-canary"
    assert container["args"][1] == "models:/Tiny_Model.v2@production"
    assert canary_container["args"][1] == "models:/Tiny_Model.v2/2"
    # the autoscaler owns the stable count (a fixed replicas would be reset by every apply); the canary's is fixed
    assert "replicas" not in stable["spec"] and canary["spec"]["replicas"] == 1
    hpa, pdb = docs["hpa.yaml"], docs["pdb.yaml"]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 4)  # default max: max(4, --replicas)
    assert hpa["spec"]["scaleTargetRef"]["name"] == stable["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    assert pdb["spec"]["selector"]["matchLabels"] == stable["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert container["image"] == "registry.example/lmctl:1"
    assert container["resources"]["requests"]["cpu"] == "500m"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "MLFLOW_TRACKING_URI", "value": "http://mlflow.ml:5000"} in container["env"]
    _check_service(docs["service.yaml"], stable, canary)
    _check_service(docs["service-canary.yaml"], canary, stable)

    route = docs["httproute.yaml"]
    _check_object(route, "HTTPRoute", "gateway.networking.k8s.io/v1")
    (rule,) = route["spec"]["rules"]
    weights = {b["name"]: b["weight"] for b in rule["backendRefs"]}
    assert weights == {"tiny-model-v2": 80, "tiny-model-v2-canary": 20} and sum(weights.values()) == 100
    services = {docs[f]["metadata"]["name"]: docs[f] for f in ("service.yaml", "service-canary.yaml")}
    for backend in rule["backendRefs"]:
        assert backend["port"] in [p["port"] for p in services[backend["name"]]["spec"]["ports"]]
    assert route["spec"]["parentRefs"][0]["name"]


def test_kubernetes_refuses_bad_input(cli, checkpoint: Path, tmp_path: Path) -> None:
    from lmctl.deploy.kubernetes import dns_label

    assert dns_label("Tiny_Model.v2") == "tiny-model-v2" and dns_label("--A--b--") == "a-b"
    assert len(dns_label("x" * 200)) <= 63 - len("-canary")
    local = cli("deploy", checkpoint, "--target", "kubernetes", "--out", tmp_path / "a")
    assert local.code == 2 and "models:/" in local.err  # pods cannot see a local path
    assert cli("register", checkpoint, "--name", "tiny").code == 0
    ref = "models:/tiny/1"
    bad_slo = tmp_path / "slo.yaml"
    bad_slo.write_text("availability: 99.5\n")  # a percent where a share is expected
    for extra in (["--canary", ref, "--canary-weight", "0"], ["--canary", ref, "--canary-weight", "1"],
                  ["--canary", ref, "--canary-weight", "0.125"], ["--canary-weight", "0.1"], ["--memory", "4 GB"], ["--cpu", "two"], ["--name", "Bad_Name"],
                  ["--namespace", "Prod"], ["--canary", "models:/tiny/9"], ["--replicas", "3", "--max-replicas", "2"],
                  ["--slo", str(tmp_path / "missing.yaml")], ["--slo", str(bad_slo)]):
        result = cli("deploy", ref, "--target", "kubernetes", "--out", tmp_path / "b", *extra)
        assert result.code == 2, (extra, result.err)
        assert not (tmp_path / "b").exists()
    percent = cli("deploy", ref, "--target", "kubernetes", "--out", tmp_path / "b", "--canary", ref, "--canary-weight", "20")
    assert percent.code == 2 and "fraction" in percent.err and "give 0.2" in percent.err  # the old unit, named
    plain = cli("deploy", ref, "--target", "kubernetes", "--out", tmp_path / "c", "--json")
    assert plain.code == 0 and not (tmp_path / "c" / "httproute.yaml").exists()
    assert any("sqlite" in w for w in plain.json["warnings"])  # the embedded registry is unreachable from pods
