"""The memory plan and the device decisions of `lmctl train` (issue 25 items 2-3), tested on the
CPU: a GPU's answers are given to the decisions as a `Device`, so `auto`'s dtype, the bf16
refusal, the estimate's dtype and CUDA-context terms and the refuse-or-warn choice are checked
without one. The training tests run real `lmctl train` on the tiny model."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import yaml

from lmctl.device import Device, cpu_device, cuda_device, resolve_dtype
from lmctl.errors import BadInputError
from lmctl.train import memory

GB = 2**30
H100 = cuda_device("NVIDIA H100 80GB HBM3", (9, 0), 79 * GB, 80 * GB)
T4 = cuda_device("Tesla T4", (7, 5), 14 * GB, 15 * GB)
CPU = Device("cpu", "cpu", True, 16 * GB, 32 * GB)
# the Qwen2.5-0.5B shape of issue 25 (6 layers, tied 151,936-token head), LoRA r 16 on every linear layer
QWEN_SHAPE = memory.Shape(total_params=180_000_000, trainable_params=4_400_000, quantizable_params=40_000_000,
                          hidden=896, intermediate=4864, kv_dim=128, heads=14, layers=6, vocab=151_936,
                          eager_attention=False)


def test_auto_dtype_follows_the_device() -> None:
    assert resolve_dtype("auto", H100) == "bfloat16"
    assert resolve_dtype("auto", T4) == "float16"  # no native bf16 (compute capability 7.5): fp16, not a Trainer error
    assert resolve_dtype("auto", CPU) == "float32"
    assert resolve_dtype("float32", H100) == "float32"
    assert cpu_device().free_bytes > 0


def test_precision_is_checked_against_the_device(tiny_config: Path) -> None:
    from lmctl.config import load_config
    from lmctl.train.preflight import check_hardware, mixed_precision

    with pytest.raises(BadInputError, match="Tesla T4 has no native bfloat16"):
        check_hardware(load_config(tiny_config, ["model.dtype=bfloat16"]), T4)
    check_hardware(load_config(tiny_config, ["model.dtype=bfloat16"]), H100)
    check_hardware(load_config(tiny_config, ["model.dtype=auto"]), T4)
    assert mixed_precision(resolve_dtype("auto", T4), T4) == {"bf16": False, "fp16": True}
    assert mixed_precision(resolve_dtype("auto", H100), H100) == {"bf16": True, "fp16": False}
    assert mixed_precision(resolve_dtype("auto", CPU), CPU) == {"bf16": False, "fp16": False}


def test_estimate_counts_the_dtype_and_runtime_of_the_device() -> None:
    work = memory.Workload(batch=2, seq=1024, gradient_checkpointing=False)
    gpu, cpu = memory.estimate(QWEN_SHAPE, work, "bfloat16", H100), memory.estimate(QWEN_SHAPE, work, "float32", CPU)
    frozen = QWEN_SHAPE.total_params - QWEN_SHAPE.trainable_params
    assert gpu.weights_gb == pytest.approx(frozen * 2 / GB, abs=1e-3) and gpu.dtype == "bfloat16"
    assert cpu.weights_gb == pytest.approx(frozen * 4 / GB, abs=1e-3)
    assert gpu.runtime_gb == 0.5 and cpu.runtime_gb == pytest.approx(0.7)  # the CUDA context, not the CPU's RSS
    assert gpu.optimizer_gb == cpu.optimizer_gb == pytest.approx(QWEN_SHAPE.trainable_params * 16 / GB, abs=1e-3)
    assert cpu.dominant == "logits" and cpu.fits  # 2 x 1024 x 151,936 floats, several copies
    # QLoRA: NF4 blocks, but peft's kbit preparation casts the embedding and head to float32, so on
    # this embedding-heavy shape it costs more, and on a deep model it saves
    qlora = memory.Workload(2, 1024, False, quantize_4bit=True)
    assert memory.estimate(QWEN_SHAPE, qlora, "bfloat16", H100).weights_gb > gpu.weights_gb
    deep = dataclasses.replace(QWEN_SHAPE, total_params=1_500_000_000, quantizable_params=1_300_000_000, layers=28)
    assert (memory.estimate(deep, qlora, "bfloat16", H100).weights_gb
            < memory.estimate(deep, work, "bfloat16", H100).weights_gb / 2)
    checkpointed = memory.estimate(QWEN_SHAPE, memory.Workload(2, 1024, True), "bfloat16", H100)
    assert checkpointed.activations_gb < gpu.activations_gb / 3


def test_recomputing_the_gated_mlp_counts_two_intermediate_tensors_less(tiny_base: Path) -> None:
    from peft import LoraConfig

    shape = memory.model_shape(str(tiny_base), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.gated_mlp  # the tiny Llama's MLP is down(act(gate(x)) * up(x))
    gated = dataclasses.replace(QWEN_SHAPE, gated_mlp=True)
    plain = memory.Workload(batch=2, seq=1024, gradient_checkpointing=False)
    recompute = dataclasses.replace(plain, recompute_mlp=True)
    saved = (memory.activation_bytes(gated, plain, 4, False) - memory.activation_bytes(gated, recompute, 4, False))
    assert saved == 2 * 6 * 2 * 1024 * 4864 * 4  # act(gate) and the product: layers x tokens x intermediate x fp32
    assert memory.activation_bytes(QWEN_SHAPE, recompute, 4, False) == memory.activation_bytes(QWEN_SHAPE, plain, 4, False)


def test_a_plan_over_the_free_memory_names_the_knob_and_refuses_on_cuda(caplog: pytest.LogCaptureFixture) -> None:
    small_gpu = cuda_device("NVIDIA L4", (8, 9), int(1.5 * GB), 24 * GB)
    work = memory.Workload(batch=8, seq=4096, gradient_checkpointing=False)
    plan = memory.estimate(QWEN_SHAPE, work, "bfloat16", small_gpu)
    assert not plan.fits and plan.dominant == "logits"
    assert plan.advice and plan.advice.startswith("train.kernels=auto")  # the largest saving of the knobs
    chunked = memory.estimate(QWEN_SHAPE, dataclasses.replace(work, kernel="chunked"), "bfloat16", small_gpu)
    assert chunked.logits_gb < plan.logits_gb / 20 and chunked.advice.startswith("train.batch_size=1")
    with pytest.raises(BadInputError, match=r"needs .* GB but 1.5 GB is free on NVIDIA L4 \(largest part: logits"):
        memory.check(plan, "auto", small_gpu)
    memory.check(plan, "warn", small_gpu)
    memory.check(plan, "off", small_gpu)
    tight_cpu = Device("cpu", "cpu", True, int(1.5 * GB), 4 * GB)
    cpu_plan = memory.estimate(QWEN_SHAPE, work, "float32", tight_cpu)
    with caplog.at_level(logging.WARNING, logger="lmctl.train"):
        memory.check(cpu_plan, "auto", tight_cpu)  # the CPU warns by default
    assert "free on this CPU" in caplog.text
    with pytest.raises(BadInputError):
        memory.check(cpu_plan, "refuse", tight_cpu)


def test_train_refuses_a_plan_over_free_memory_before_loading_weights(cli, tiny_config: Path) -> None:
    result = cli("train", tiny_config, "--set", "train.batch_size=2000000", "--set", "train.memory_check=refuse")
    assert result.code == 2
    assert "memory plan needs" in result.err and "train.batch_size=1" in result.err
    assert not list((Path(yaml.safe_load(tiny_config.read_text())["output"]["dir"])).glob("*/checkpoints"))
    plan = cli("train", tiny_config, "--set", "train.batch_size=2000000", "--dry-run", "--json").json["memory"]
    assert not plan["fits"] and plan["advice"] and plan["dominant"] in memory.PARTS


def _config(tiny_config: Path, tmp_path: Path, max_length: int = 64, **train: object) -> Path:
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["train"].update(train)
    cfg["data"]["max_length"] = max_length
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_reports_real_tokens_final_loss_and_steady_rate(cli, tiny_config: Path, tmp_path: Path) -> None:
    """One epoch over the 30 packed rows of 96 tokens at most, 2 per batch: every row is trained
    once, so `tokens` is the data's tokens, without the padding at the end of the shorter row
    of each batch nor the validation batches; the run is shorter than log_every and still
    reports its final loss."""
    from lmctl.config import load_config
    from lmctl.train.plan import PlannedRun

    config = _config(tiny_config, tmp_path, max_length=96, max_steps=None, epochs=1, batch_size=2, log_every=1000,
                     eval_every=3, save_every=1000)
    rows = PlannedRun(load_config(config), "never").train.rows_for(True)
    real = sum(len(rows[i]["input_ids"]) for i in range(len(rows)))
    assert len(rows) % 2 == 0 and real < len(rows) * 96
    result = cli("train", config, "--json")
    assert result.code == 0, result.err
    report = result.json
    assert report["steps"] == len(rows) // 2 and report["tokens"] == real
    assert report["train_loss"] is not None and report["train_loss"] > 0
    assert report["tokens_per_s_steady"] is not None and report["tokens_per_s_steady"] > 0


def test_training_steps_do_not_sync_with_the_device(tiny_config: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Tensor.item and Tensor.__bool__ are what wait for a GPU; between logs no step may call them
    from the Trainer's loop (the token count and the NaN filter did, once per micro-batch)."""
    import sys

    import torch

    from lmctl.config import load_config
    from lmctl.train import train

    calls: list[str] = []
    for name in ("item", "__bool__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *a, _real=real, _name=name):  # type: ignore[no-untyped-def]
            frame = sys._getframe(1)
            if frame.f_code.co_filename.endswith("transformers/trainer.py"):
                calls.append(f"{_name} in {frame.f_code.co_name}")
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, name, spy)
    config = _config(tiny_config, tmp_path, max_steps=8, log_every=1000, save_every=1000, eval_every=1000)
    cfg = load_config(config, ["data.validation=null"])
    train(cfg, resume="never")
    per_step = [c for c in calls if "_run_epoch" in c or "_track_num_input_tokens" in c]
    assert per_step == [], per_step
    assert len(calls) <= 4, calls  # the final log's loss and grad norm, the run's mean loss


def test_packing_probe_runs_at_the_training_shape(cli, tiny_config: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="lmctl.train"):
        result = cli("train", tiny_config, "--set", "train.max_steps=1", "--set", "train.batch_size=3")
    assert result.code == 0, result.err
    assert "packing probe: 3 rows of 64 tokens on cpu" in caplog.text


def test_packing_probe_uses_the_batch_and_length_given(tiny_base: Path) -> None:
    from lmctl.data.packing import packing_is_isolated
    from lmctl.loading import load_base_model

    model = load_base_model(str(tiny_base)).eval()
    model.config.use_cache = False
    shapes: list[tuple[int, ...]] = []
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    assert packing_is_isolated(model, model.config.vocab_size, batch=3, length=40)
    assert (3, 40) in shapes and not any(s[-1] == model.config.vocab_size for s in shapes)


def test_an_unreachable_tracking_server_stops_train_before_the_first_step(cli, tiny_config: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLflow run opens in the background while the model loads; its failure still ends the
    run with exit 5 and one line before any step trains."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = cli("train", tiny_config, "--json")
    assert result.code == 5 and result.out == "", result.err
    assert "unavailable" in result.err and "Traceback" not in result.err
    assert sum(line.startswith("lmctl: error:") for line in result.err.splitlines()) == 1
    runs = Path(yaml.safe_load(tiny_config.read_text())["output"]["dir"])
    assert not list(runs.glob("*/trainer/checkpoint-*")) and not list(runs.glob("*/checkpoints/*"))


def _saved_bytes(model, ids, positions) -> int:  # type: ignore[no-untyped-def]
    """Bytes autograd keeps for backward over one forward: unique storages, parameters excluded."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids, position_ids=positions).loss.backward()
    return sum(saved.values())


def test_activations_count_what_autograd_saves_and_what_a_packed_mask_adds() -> None:
    """A real Llama with LoRA on every linear layer and the recomputed gated MLP, as lmctl trains
    it: the bytes saved for backward match activation_bytes (LoRA's rank-sized inputs and the
    shared embedding, final norm and rotary tables make the few percent more), and rows holding
    several examples add exactly what the plan says: each layer's float copy of the
    block-diagonal mask and k, v expanded to every head."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmctl.train import gated_mlp, headloss

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, use_cache=False)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    gated_mlp.install(model)
    headloss.install(model, "auto")  # the logits are the plan's `logits` part, not activations
    batch, seq = 2, 96
    ids = torch.randint(0, 300, (batch, seq))
    causal = _saved_bytes(model, ids, torch.arange(seq).repeat(batch, 1))
    packed = _saved_bytes(model, ids, torch.arange(seq // 3).repeat(batch, 3))  # three examples per row
    shape = memory.Shape(0, 0, 0, hidden=64, intermediate=128, kv_dim=32, heads=4, layers=6, vocab=300,
                         eager_attention=False, gated_mlp=True)
    work = memory.Workload(batch, seq, False, recompute_mlp=True)
    planned = memory.activation_bytes(shape, work, 4, False)
    assert 1.0 <= causal / planned <= 1.1, (causal, planned)
    added = memory.activation_bytes(shape, dataclasses.replace(work, packed=True), 4, False) - planned
    assert added == 6 * batch * seq * (2 * 4 * (64 - 32) + 4 * seq)
    assert packed - causal == added


def test_the_cpu_heap_keeps_six_of_each_layers_largest_temporary_under_the_mmap_ceiling() -> None:
    """heap_bytes: glibc serves blocks under 32 MiB from its heap, where forward's freed
    temporaries stay resident (about six of the largest per layer, measured at three shapes);
    larger blocks are mmapped and returned; gradient checkpointing frees the same temporaries;
    CUDA adds nothing."""
    smol = memory.Shape(0, 0, 0, hidden=576, intermediate=1536, kv_dim=192, heads=9, layers=30, vocab=49152,
                        eager_attention=False, gated_mlp=True)
    long_row = memory.Workload(1, 2048, False, recompute_mlp=True, packed=True)
    assert memory.heap_bytes(smol, long_row, 4, glibc=True) == 6 * 30 * 2048 * 1536 * 4  # intermediates: 12 MiB
    # Qwen2.5-0.5B's 4864-wide intermediates at 2048 tokens are 38 MiB: mmapped; the hidden-sized ones stay
    assert memory.heap_bytes(QWEN_SHAPE, long_row, 4, glibc=True) == 6 * 6 * 2048 * 896 * 4
    assert memory.heap_bytes(QWEN_SHAPE, dataclasses.replace(long_row, seq=512, batch=2), 4, True) == 6 * 6 * 1024 * 4864 * 4
    assert memory.heap_bytes(smol, long_row, 4, glibc=False) == 0
    checkpointed = dataclasses.replace(long_row, gradient_checkpointing=True)
    assert memory.heap_bytes(smol, checkpointed, 4, True) == memory.heap_bytes(smol, long_row, 4, True)
    cpu = memory.parts(smol, long_row, "float32", CPU)["activations"]
    gpu = memory.parts(smol, long_row, "float32", H100)["activations"]
    assert cpu - gpu == memory.heap_bytes(smol, long_row, 4, memory._glibc())
