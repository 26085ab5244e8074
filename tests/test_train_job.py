"""`lmctl train CONFIG --emit kubernetes`: an Indexed Job running torchrun, checked by the tools that run it.

Every rendered object passes `kubernetes-validate --strict` (the validator of
test_deploy_validators.py) and a broken copy is refused by it; the container's argv is parsed by
torch's own torchrun parser; the shell wrapper that makes pod 0 the rendezvous host runs in a real
/bin/sh; and (slow) the container's exact command trains the tiny model on CPU with the endpoint
pointed at localhost, the ConfigMap's config and the mounts laid out as the pods see them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ASSETS, CliResult
from test_deploy_validators import kubernetes_validate

MANIFESTS = ("configmap.yaml", "service.yaml", "job.yaml")


def make_project(root: Path, **config: Any) -> Path:
    """A project directory as a user has it: cfg.yaml beside data/ (relative paths), as on the data volume."""
    (root / "data").mkdir(parents=True)
    for name in ("tiny_train.jsonl", "tiny_validation.jsonl"):
        shutil.copy(ASSETS / name, root / "data" / name)
    cfg = {"model": {"base": "smollm2-135m"},
           "data": {"train": "data/tiny_train.jsonl", "validation": "data/tiny_validation.jsonl", "max_length": 64},
           "train": {"batch_size": 4, "grad_accum": 2, "max_steps": 10},
           "output": {"dir": "runs", "run_name": "tiny-lora"},
           "registry": {"name": "tiny", "tracking_uri": "http://mlflow.internal:5000"},
           "retrain": {"eval_data": "/somewhere/local/eval.jsonl"}}
    for section, values in config.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return root / "cfg.yaml"


def emit(cli: Any, config: Path, out: Path, *extra: str) -> CliResult:
    return cli("train", config, "--emit", "kubernetes", "--nnodes", "2", "--gpus-per-node", "4", "--out", out,
               "--json", *extra)


@pytest.fixture
def rendered(cli: Any, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    result = emit(cli, make_project(tmp_path / "project"), tmp_path / "job")
    assert result.code == 0, result.err
    return tmp_path / "job", result.json


def load(out: Path, name: str) -> dict[str, Any]:
    return yaml.safe_load((out / name).read_text())


def container(out: Path) -> dict[str, Any]:
    return load(out, "job.yaml")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("version", ["1.26.0", "1.37.0"])  # podFailurePolicy is on by default since 1.26
def test_every_manifest_passes_strict_validation(rendered: tuple[Path, dict[str, Any]], version: str) -> None:
    out, _ = rendered
    done = kubernetes_validate(*(out / name for name in MANIFESTS), version=version)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(MANIFESTS)


@pytest.mark.parametrize(("path", "value", "complaint"), [
    (("spec", "template", "spec", "subDomain"), "tiny-lora", "subDomain"),  # a typo: unknown field
    (("spec", "parallelism"), "two", "parallelism"),
    (("spec", "template", "spec", "containers", 0, "volumeMounts", 3, "mountPath"), None, "mountPath"),
])
def test_a_broken_job_is_refused(rendered: tuple[Path, dict[str, Any]], tmp_path: Path, path: tuple[Any, ...],
                                 value: Any, complaint: str) -> None:
    job = load(rendered[0], "job.yaml")
    parent = job
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    broken = tmp_path / "broken-job.yaml"
    broken.write_text(yaml.safe_dump(job))
    refused = kubernetes_validate(broken)
    assert refused.returncode != 0 and complaint in refused.stdout + refused.stderr, refused.stdout


def test_torchrun_rendezvous_reaches_pod_0_through_the_headless_service(rendered: tuple[Path, dict[str, Any]]) -> None:
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
    from torch.distributed.run import get_args_parser

    out, result = rendered
    job, service = load(out, "job.yaml"), load(out, "service.yaml")
    spec, pod = job["spec"], job["spec"]["template"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    assert pod["spec"]["restartPolicy"] == "Never" and 0 < spec["backoffLimit"] <= 10
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["metadata"]["name"] == pod["spec"]["subdomain"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()

    c = container(out)
    args = get_args_parser().parse_args(c["args"])  # torchrun's own parser, as the pod runs it
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.max_restarts) == ("2", "4", "c10d", 3)
    assert args.module and args.training_script == "lmctl"
    assert args.training_script_args == ["train", "/config/config.yaml", "--json"]
    host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=-1)
    # pod i of an Indexed Job has the hostname JOB-i; with `subdomain` its DNS name is JOB-i.SUBDOMAIN
    assert host == f"{job['metadata']['name']}-0.{pod['spec']['subdomain']}"
    assert port == service["spec"]["ports"][0]["port"] == c["ports"][0]["containerPort"]
    assert c["command"][:2] == ["/bin/sh", "-c"] and result["torchrun"] == " ".join(["torchrun", *c["args"]])


@pytest.mark.parametrize(("index", "is_host"), [("0", "1"), ("1", "0"), ("7", "0")])
def test_pod_0_alone_hosts_the_rendezvous_store(rendered: tuple[Path, dict[str, Any]], tmp_path: Path,
                                                index: str, is_host: str) -> None:
    """The container command in a real /bin/sh, with a `torchrun` on PATH that prints its argv."""
    fake = tmp_path / "bin" / "torchrun"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    fake.chmod(0o755)
    c = container(rendered[0])
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": index}
    done = subprocess.run(c["command"] + c["args"], env=env, capture_output=True, text=True, timeout=30, check=True)
    # one --rdzv-conf (torchrun keeps only the last one given): the launcher's join_timeout and is_host
    assert done.stdout.splitlines() == [f"--rdzv-conf=join_timeout=600,is_host={is_host}", *c["args"]]
    assert not any(a.startswith("--rdzv-conf") for a in c["args"])


def test_gpus_secret_volumes_and_config(rendered: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    from lmctl.config import load_config

    out, result = rendered
    c, pod = container(out), load(out, "job.yaml")["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4 and c["resources"]["requests"]["nvidia.com/gpu"] == 4
    env = {e["name"]: e for e in c["env"]}
    assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["secretKeyRef"] == {"name": "lmctl-tracking", "key": "uri"}
    assert env["LMCTL_HOME"]["value"] == "/runs/.lmctl"  # on the output volume: cache and pulls survive restarts
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"]["value"] == "1"  # else restarted workers read a stale store
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts) == set(volumes) == {"config", "data", "output", "dshm"}
    assert (mounts["data"]["mountPath"], mounts["data"]["readOnly"]) == ("/data", True)
    assert mounts["output"]["mountPath"] == "/runs" and not mounts["output"].get("readOnly")
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "lmctl-data", "readOnly": True}
    assert volumes["output"]["persistentVolumeClaim"] == {"claimName": "lmctl-runs"}
    assert (mounts["dshm"]["mountPath"], volumes["dshm"]["emptyDir"]) == ("/dev/shm", {"medium": "Memory"})
    configmap = load(out, "configmap.yaml")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert mounts["config"]["mountPath"] + "/config.yaml" == c["args"][c["args"].index("train") + 1]

    (tmp_path / "pod.yaml").write_text(configmap["data"]["config.yaml"])
    cfg = load_config(tmp_path / "pod.yaml")  # the pod's config validates as `lmctl train` will read it
    assert cfg.data.train == Path("/data/data/tiny_train.jsonl") and cfg.data.validation.parent == Path("/data/data")
    assert cfg.output.dir == Path("/runs") and cfg.output.run_name == "tiny-lora"
    assert cfg.registry.tracking_uri is None  # the Secret's URI wins; the config's is not copied
    assert cfg.retrain.eval_data is None  # sections train does not read stay behind (local paths)
    assert result["paths"] == {"data.train": "/data/data/tiny_train.jsonl",
                               "data.validation": "/data/data/tiny_validation.jsonl", "output.dir": "/runs"}
    assert any("registry.tracking_uri" in w for w in result["warnings"])
    assert any("catalog model" in w and "/runs/.lmctl" in w for w in result["warnings"])


def test_json_result(rendered: tuple[Path, dict[str, Any]]) -> None:
    out, result = rendered
    assert set(result) == {"target", "out", "job", "namespace", "nodes", "gpus_per_node", "world_size",
                           "sequences_per_step", "torchrun", "paths", "files", "commands", "warnings"}
    assert result["files"] == ["configmap.yaml", "job.yaml", "kustomization.yaml", "service.yaml"]
    assert sorted(p.name for p in out.iterdir()) == result["files"]
    assert (result["job"], result["out"], result["world_size"], result["sequences_per_step"]) == \
        ("tiny-lora-train", str(out), 8, 4 * 2 * 8)
    assert result["commands"]["apply"] == f"kubectl apply -k {out}"
    assert load(out, "kustomization.yaml")["resources"] == list(MANIFESTS)


def test_one_pod_per_machine(rendered: tuple[Path, dict[str, Any]]) -> None:
    """Required anti-affinity per hostname against the Job's own pods: the selector matches the
    pods' labels (a typo there would make the rule select nothing and keep nothing apart)."""
    pod = load(rendered[0], "job.yaml")["spec"]["template"]
    terms = pod["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert len(terms) == 1 and terms[0]["topologyKey"] == "kubernetes.io/hostname"
    assert terms[0]["labelSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert terms[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/name"] == rendered[1]["job"]


def test_job_name_is_the_run_and_train_never_a_doubled_word(cli: Any, tmp_path: Path) -> None:
    """configs/config.yaml without output.run_name gave Job `config` and ConfigMap `config-config`."""
    config = make_project(tmp_path / "p", output={"run_name": None})
    config = config.rename(config.with_name("config.yaml"))
    result = emit(cli, config, tmp_path / "job")
    assert result.code == 0, result.err
    names = {name: load(tmp_path / "job", name)["metadata"]["name"] for name in MANIFESTS}
    assert result.json["job"] == names["job.yaml"] == names["service.yaml"] == "config-train"
    assert names["configmap.yaml"] == "config-train-config"
    long = emit(cli, make_project(tmp_path / "q", output={"run_name": "a" * 80}), tmp_path / "job2")
    assert long.code == 0, long.err
    assert len(f"{long.json['job']}-999999") <= 63 and long.json["job"].endswith("-train")  # pod hostnames JOB-INDEX
    assert emit(cli, config, tmp_path / "job3", "--name", "pretrain").json["job"] == "pretrain"


def test_the_placeholder_image_is_a_warning(cli: Any, tmp_path: Path) -> None:
    """The default --image names no image a cluster can pull: said in `warnings` and on stderr."""
    config = make_project(tmp_path / "p")
    default = emit(cli, config, tmp_path / "job")
    assert default.code == 0, default.err
    warned = [w for w in default.json["warnings"] if "placeholder" in w]
    assert len(warned) == 1 and "--image lmctl:" in warned[0] and f"warning: {warned[0]}" in default.err
    own = emit(cli, config, tmp_path / "job2", "--image", "registry.example.com/lmctl:0.1.0")
    assert own.code == 0 and not [w for w in own.json["warnings"] if "placeholder" in w]
    assert "placeholder" not in own.err


def test_the_documented_network_policy_lets_the_pods_meet(rendered: tuple[Path, dict[str, Any]],
                                                          tmp_path: Path) -> None:
    """The workers' store and the collectives use ports torch picks, so docs/distributed.md gives a
    NetworkPolicy opening every port between the Job's pods: it validates and selects the pods."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.launcher.api import _get_addr_and_port

    # torch reads --master-port/--master-addr for the static backend only: with c10d, rank 0's
    # agent picks the workers' store port (if this starts returning a port, pin it instead)
    c10d = RendezvousParameters(backend="c10d", endpoint="job-0.job:29400", run_id="job", min_nodes=2, max_nodes=2)
    assert _get_addr_and_port(c10d) == (None, None)

    out, result = rendered
    docs = (Path(__file__).parent.parent / "docs" / "distributed.md").read_text()
    block = docs.split("```yaml\n# network-policy.yaml", 1)[1].split("```", 1)[0]
    policy_file = tmp_path / "network-policy.yaml"
    policy_file.write_text(block.replace("JOB", result["job"]))
    done = kubernetes_validate(policy_file)
    assert done.returncode == 0, done.stdout + done.stderr
    policy = yaml.safe_load(policy_file.read_text())
    labels = load(out, "job.yaml")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (peers,) = policy["spec"]["ingress"]
    assert peers["from"][0]["podSelector"]["matchLabels"].items() <= labels.items() and "ports" not in peers


def test_paths_already_on_the_volume_are_kept(cli: Any, tmp_path: Path) -> None:
    config = make_project(tmp_path / "p", data={"train": "/data/shared/train.jsonl", "validation": None},
                          model={"base": str(tmp_path / "p" / "models" / "base")})
    result = emit(cli, config, tmp_path / "job")
    assert result.code == 0, result.err
    assert result.json["paths"]["data.train"] == "/data/shared/train.jsonl"
    assert result.json["paths"]["model.base"] == "/data/models/base"  # a local base under the data root


@pytest.mark.parametrize(("args", "config", "complaint"), [
    (("--nnodes", "0"), {}, "--nnodes: "),
    (("--image", ""), {}, "--image"),
    ((), {"data": {"train": str(ASSETS / "tiny_train.jsonl")}}, "data.train"),  # outside the data root
    ((), {"data": {"train": None}}, "data.train is not set"),
    (("--data-mount", "data"), {}, "--data-mount"),
    (("--output-mount", "/data/runs"), {}, "must not overlap"),
    (("--name", "2-lora"), {}, "start with a letter"),
    (("--tracking-secret", "Bad_Name"), {}, "--tracking-secret"),
    (("--emit", "docker"), {}, "--emit 'docker'"),
    (("--dry-run",), {}, "--dry-run"),
])
def test_bad_input_exits_2_and_writes_nothing(cli: Any, tmp_path: Path, args: tuple[str, ...],
                                              config: dict[str, Any], complaint: str) -> None:
    result = emit(cli, make_project(tmp_path / "p", **config), tmp_path / "job", *args)
    assert result.code == 2 and complaint in result.err and "Traceback" not in result.err, result.err
    assert result.out == "" and not (tmp_path / "job").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no staging directory left either


def test_cluster_flags_need_emit_and_out_must_be_empty(cli: Any, tmp_path: Path) -> None:
    config = make_project(tmp_path / "p")
    without = cli("train", config, "--nnodes", "2")
    assert without.code == 2 and "--nnodes applies to --nproc-per-node or --emit kubernetes only" in without.err
    elastic = cli("train", config, "--emit", "kubernetes", "--nnodes", "1:4", "--out", str(tmp_path / "k"))
    assert elastic.code == 2 and "--emit kubernetes runs a fixed number of pods" in elastic.err
    old = cli("train", config, "--emit", "kubernetes", "--nodes", "2", "--gpus-per-node", "0", "--out",
              str(tmp_path / "old"), "--json")
    assert old.code == 0 and old.json["nodes"] == 2 and "--nodes is now --nnodes" in old.err
    no_out = cli("train", config, "--emit", "kubernetes")
    assert no_out.code == 2 and "--out" in no_out.err
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "mine.txt").write_text("keep")
    assert emit(cli, config, tmp_path / "job").code == 2 and (tmp_path / "job" / "mine.txt").exists()
    assert emit(cli, config, tmp_path / "job", "--force").code == 0
    assert not (tmp_path / "job" / "mine.txt").exists() and (tmp_path / "job" / "job.yaml").is_file()


def test_emit_imports_no_heavy_library(tmp_path: Path) -> None:
    config = make_project(tmp_path / "p")
    code = ("import sys\nfrom lmctl.cli import main\n"
            f"rc = main(['train', {str(config)!r}, '--emit', 'kubernetes', '--out', {str(tmp_path / 'job')!r}])\n"
            "print(rc, [m for m in ('torch', 'transformers', 'mlflow', 'datasets', 'peft') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert out.strip().splitlines()[-1] == "0 []"


@pytest.mark.slow  # 16-22 s on this machine: torchrun, model load, two steps
def test_the_container_command_trains_on_cpu(cli: Any, tmp_path: Path, tiny_base: Path) -> None:
    """The pod's exact command, one CPU process: volumes as directories, the endpoint on localhost."""
    from conftest import free_port

    project = tmp_path / "project"
    shutil.copytree(tiny_base, project / "models" / "tiny")
    config = make_project(project, model={"base": "models/tiny"}, lora={"r": 4, "alpha": 8, "dropout": 0.0},
                          train={"max_steps": 2, "batch_size": 4, "grad_accum": 1, "save_every": 2, "eval_every": 2},
                          registry={"tracking_uri": None})
    data, runs = tmp_path / "volumes" / "data", tmp_path / "volumes" / "runs"
    result = cli("train", config, "--emit", "kubernetes", "--gpus-per-node", "0", "--data-mount", data,
                 "--output-mount", runs, "--out", tmp_path / "job", "--json")
    assert result.code == 0, result.err
    shutil.copytree(project, data)  # what the user copies onto the data volume: the data root's contents
    runs.mkdir()
    pod_config = tmp_path / "config.yaml"
    pod_config.write_text(load(tmp_path / "job", "configmap.yaml")["data"]["config.yaml"])

    c = container(tmp_path / "job")
    local = {"--rdzv-endpoint": f"localhost:{free_port()}", "--nnodes": "1", "--nproc-per-node": "1"}
    args = [f"{a.split('=')[0]}={local[a.split('=')[0]]}" if a.split("=")[0] in local else a for a in c["args"]]
    args = [str(pod_config) if a == "/config/config.yaml" else a for a in args]
    env = {**os.environ, "JOB_COMPLETION_INDEX": "0", "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LMCTL_HOME": next(e["value"] for e in c["env"] if e["name"] == "LMCTL_HOME"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}  # what the Secret holds
    done = subprocess.run(c["command"] + args, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    trained = json.loads(done.stdout.strip().splitlines()[-1])
    assert trained["steps"] == 2 and trained["checkpoint"] == str(runs / "tiny-lora" / "checkpoints" / "step-000002")
    assert (runs / ".lmctl" / "cache").is_dir()  # LMCTL_HOME on the output volume
