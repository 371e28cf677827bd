"""Sequence parallelism (Ulysses, wan/modules/sequence_parallel.py) on CPU with gloo, 2 and 4 ranks: forward
outputs, parameter gradients (summed over the sp group) and input gradients (whole on every rank) equal the
one-rank run in fp32 for WanModel and CausalWanModel (block-causal mask, local window + sink, a partial last
block), with RoPE, pose tokens and the i2v y / CLIP inputs; one DMD iteration under SP x FSDP2 equals the
one-rank iteration; the errors name the numbers."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import randomize, rel_err, tiny_inputs, tiny_pose

from wan.modules.attention import BlockCausalSpec
from wan.modules.sequence_parallel import join_tokens, split_tokens

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


# ----------------------------------------------------------------------------- one process


def test_split_join_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 8 * 1).float().reshape(2, 3 * 8, 1)  # B 2, F 3, T 8
    parts = torch.stack([split_tokens(x, 3, 4, r) for r in range(4)])  # [N, B, F*T/N, 1]
    assert torch.equal(join_tokens(parts, 3), x)
    assert split_tokens(x, 3, 4, 1)[0, :, 0].tolist() == [2, 3, 10, 11, 18, 19]  # run 1 of every frame


@pytest.mark.parametrize("window, sink, frames", [(-1, 0, 6), (3, 3, 12), (-1, 0, 8)])
def test_block_causal_mask_in_shard_order(window, sink, frames):
    """The mask of the gathered (shard, frame, token) order is the one-rank mask with its tokens permuted."""
    tokens, shards = 12, 4
    base = BlockCausalSpec(frames, tokens, 3, window, sink)
    sharded = BlockCausalSpec(frames, tokens, 3, window, sink, shards=shards)
    order = torch.arange(frames * tokens).reshape(1, -1, 1)
    gathered = torch.cat([split_tokens(order, frames, shards, r) for r in range(shards)], dim=1)[0, :, 0]  # [L]
    assert torch.equal(sharded.token_mask(), base.token_mask()[gathered][:, gathered])


def test_config_errors_before_anything_is_built(tmp_path):
    from utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"train.sequence_parallel=2 must divide the 1 ranks"):
        _dmd_trainer(tmp_path, tmp_path, "train.sequence_parallel=2")
    with pytest.raises(ConfigError, match=r"stage 'self_forcing' runs a network through its KV cache with gradient"):
        _dmd_trainer(tmp_path, tmp_path, "train.sequence_parallel=2", "stage=self_forcing")


# ----------------------------------------------------------------------------- multi-process harness
# One spawn per world size runs every job (process start-up dominates on CPU); the tests read its results.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=180))  # no hang
    try:
        results = {}
        for name, job, args in JOBS[world]:
            results[name] = job(rank, world, Path(out) / name, **args)
        if rank == 0:
            (Path(out) / "results.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[pytest.param(w, marks=pytest.mark.slow) for w in (2, 4)],
                ids=lambda w: f"{w}ranks")  # fmt: skip
def spawned(request, tmp_path_factory) -> tuple[int, Path, dict]:
    """(world size, output folder, {job: rank 0's result}) of one spawned gloo world."""
    world = request.param
    out = tmp_path_factory.mktemp(f"sp{world}")
    _random_weights(out / "weights")
    mp.spawn(_entry, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    return world, out, json.loads((out / "results.json").read_text())


def _layout(sp: int):
    from utils.dist import DistInfo, parallel_layout

    info = DistInfo(dist.get_rank(), dist.get_world_size(), dist.get_rank(), torch.device("cpu"))
    return parallel_layout(info, sp)


# ----------------------------------------------------------------------------- network equality


CASES = {  # name: (preset, overrides, latent frames, t per frame)
    "bidirectional i2v pose teacher": ("tiny_teacher", {}, 5, False),
    "causal block mask": ("tiny", {}, 9, True),
    "causal window + sink, partial block": ("tiny", {"local_attn_size": 3, "sink_size": 3}, 11, True),
}


def _run(model, inp, tokens_fn, weight):
    """Forward + backward of sum(out * weight); returns (out, {name: grad}) for params and inputs."""
    for p in model.parameters():
        p.grad = None
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items() if k != "t"}
    tokens, ref_map = tokens_fn(model)
    y = leaves["y"] + ref_map
    out = model(leaves["x"], inp["t"], leaves["context"], leaves["clip_fea"], y, tokens)
    (out * weight).sum().backward()
    grads = {f"param {n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads.update({f"input {k}": v.grad.clone() for k, v in leaves.items()})
    return out.detach(), grads


def _network_job(rank: int, world: int, out: Path, sp: int) -> dict:
    """Each case run whole and under SP in every process; parameter gradients summed over the sp group."""
    from trainer.roles import replicated_params
    from wan.configs import build_model
    from wan.modules.sequence_parallel import SequenceParallel

    layout = _layout(sp)
    group = layout.sp_group
    errors: dict[str, float] = {}
    for name, (preset, overrides, frames, per_frame) in CASES.items():
        model = randomize(build_model(preset, num_heads=4, **overrides))
        inp = tiny_inputs(batch=2, frames=frames, seed=10 + layout.dp_rank)  # each dp row its own sample
        if not per_frame:
            inp["t"] = inp["t"][:, 0]
        pose, ref = tiny_pose(batch=2, latent_frames=frames, seed=20 + layout.dp_rank)
        weight = torch.randn(2, 16, frames, 8, 12, generator=torch.Generator().manual_seed(3))

        def tokens_fn(m, pose=pose, ref=ref):
            return m.encode_pose(pose, ref)

        ref_out, ref_grads = _run(model, inp, tokens_fn, weight)
        model.sequence_parallel = SequenceParallel(group)
        sp_out, sp_grads = _run(model, inp, tokens_fn, weight)
        replicated = {id(p) for p in replicated_params(model)}
        for pname, p in model.named_parameters():  # forward params: each rank holds its tokens' share
            key = f"param {pname}"
            if id(p) not in replicated and key in sp_grads:
                dist.all_reduce(sp_grads[key], group=group)
        assert ref_grads.keys() == sp_grads.keys()
        errors[f"{name}: output"] = rel_err(sp_out, ref_out)
        params = [k for k in ref_grads if k.startswith("param")]
        errors[f"{name}: parameter gradients"] = rel_err(
            torch.cat([sp_grads[k].flatten() for k in params]), torch.cat([ref_grads[k].flatten() for k in params])
        )
        errors[f"{name}: worst parameter"] = max(rel_err(sp_grads[k], ref_grads[k]) for k in params)
        for key in (k for k in ref_grads if k.startswith("input")):
            errors[f"{name}: {key} gradient"] = rel_err(sp_grads[key], ref_grads[key])
    gathered = [None] * world
    dist.all_gather_object(gathered, errors)
    return {k: max(e[k] for e in gathered) for k in errors}


def test_network_forward_and_gradients_equal_one_rank(spawned):
    """SP over 2 and over 4 ranks. Per parameter tensor the bound is 1e-3: a key bias's
    gradient is nearly zero by softmax's shift invariance (a sum of cancelling terms), so summation order alone
    moves it by ~1e-4 relative; a missing or doubled share of any gradient would be an O(1) error."""
    world, _, results = spawned
    errors = results[f"network sp{world}"]
    assert len(errors) == len(CASES) * (3 + 4)  # output, gradients, worst parameter; x, y, context, clip_fea
    bad = {k: v for k, v in errors.items() if not v <= (1e-3 if k.endswith("worst parameter") else TOL)}
    assert not bad, bad


def _errors_job(rank: int, world: int, out: Path) -> dict:
    from wan.configs import build_model
    from wan.modules.sequence_parallel import SequenceParallel

    sp = SequenceParallel(dist.group.WORLD)
    messages = {}
    for key, heads, (height, width) in (("heads", 1, (8, 12)), ("tokens", 2, (6, 10))):  # h*w = 3*5 = 15
        model = randomize(build_model("tiny", num_heads=heads))
        model.sequence_parallel = sp
        try:
            model(**tiny_inputs(batch=1, frames=3, height=height, width=width))
        except ValueError as err:
            messages[key] = str(err)
    causal = randomize(build_model("tiny"))
    causal.sequence_parallel = sp
    inp = tiny_inputs(batch=1, frames=3)
    try:
        causal(**inp, kv_cache=causal.new_kv_cache(1, 3, torch.float32, "cpu"))
    except RuntimeError as err:
        messages["kv cache with gradient"] = str(err)
    with torch.no_grad():  # without gradient the cached call runs whole on every rank
        streamed = causal(**inp, kv_cache=causal.new_kv_cache(1, 3, torch.float32, "cpu"))
        causal.sequence_parallel = None
        single = causal(**inp, kv_cache=causal.new_kv_cache(1, 3, torch.float32, "cpu"))
    messages["cached no-grad error"] = rel_err(streamed, single)
    return messages


def test_errors_name_both_numbers(spawned):
    world, _, results = spawned
    if world != 2:
        pytest.skip("the 2-rank world checks the errors")
    msgs = results["errors"]
    assert "num_heads=1" in msgs["heads"] and "train.sequence_parallel=2" in msgs["heads"], msgs
    assert "3*5 = 15" in msgs["tokens"] and "2 does not divide 15" in msgs["tokens"], msgs
    assert "KV-cache path with gradient" in msgs["kv cache with gradient"], msgs
    assert msgs["cached no-grad error"] == 0.0


# ----------------------------------------------------------------------------- teacher sampling: ODE pairs


def _ode_pairs_job(rank: int, world: int, out: Path) -> dict:
    """scripts/generate_ode_pairs.py's loop with the teacher split over the group (only its first rank writes)
    against the same loop on one rank."""
    from pipeline.ode_pairs import ODEPairDataset, ODEPairSettings, generate_ode_pairs
    from wan.configs import build_model
    from wan.modules.sequence_parallel import SequenceParallel

    layout = _layout(world)
    source = []
    for i in range(2):
        inp, (pose, ref) = tiny_inputs(1, 5, seed=10 + i), tiny_pose(1, 5, seed=20 + i)
        source.append({"context": inp["context"][0], "neg_context": 0.1 * inp["context"][0].flip(0),
                       "clip_fea": inp["clip_fea"][0], "y": inp["y"][0], "pose": pose[0].round(),
                       "ref_pose": ref[0].round()})  # fmt: skip
    settings = ODEPairSettings(num_steps=8)
    teacher = randomize(build_model("tiny_teacher"), seed=1).requires_grad_(False)
    written = {"one": generate_ode_pairs(teacher, source, out / "one", settings, writer=rank == 0)}  # whole
    teacher.sequence_parallel = SequenceParallel(layout.sp_group)
    written["sp"] = generate_ode_pairs(teacher, source, out / "sp", settings, layout.dp_rank, layout.dp_size,
                                       writer=layout.sp_rank == 0)  # fmt: skip
    dist.barrier()
    if rank != 0:
        return {}
    one, par = ODEPairDataset(out / "one"), ODEPairDataset(out / "sp")
    files = sorted(p.name for p in (out / "sp").iterdir())
    err = max(rel_err(par[i]["ode_latents"], one[i]["ode_latents"]) for i in range(len(one)))
    return {"written": written, "error": err, "files": files}


def test_ode_pairs_with_sequence_parallel_teacher_equal_one_rank(spawned):
    world, _, results = spawned
    if world != 2:
        pytest.skip("the 2-rank world generates the ODE pairs")
    result = results["ode pairs"]
    assert result["written"] == {"one": [0, 1], "sp": [0, 1]}
    assert result["files"] == ["00000000.safetensors", "00000001.safetensors", "manifest.json"]
    assert result["error"] <= TOL, result


# ----------------------------------------------------------------------------- one DMD iteration under SP x FSDP2


DMD = [
    "model=tiny", "data.type=synthetic", "data.num_samples=4", "data.latent_frames=6", "train.dtype=fp32",
    "train.iterations=1", "train.export=false", "train.gradient_checkpointing=true", "train.log_every=100",
    "roles.generator.lr=1e-3", "roles.critic.lr=1e-3", "train.grad_clip=0",
    "objective.steps=[1000.0,625.0]",  # two denoising steps: fewer collectives, the same code paths
]  # fmt: skip


ROLES = {"generator": "tiny", "teacher": "tiny_teacher", "critic": "tiny_bidirectional"}


def _random_weights(folder: Path) -> None:
    """Random weights for every DMD role (the official init's zero heads would make every score equal)."""
    from wan.checkpoint import save_weights
    from wan.configs import build_model

    folder.mkdir(parents=True)
    for i, (role, preset) in enumerate(ROLES.items()):
        save_weights(randomize(build_model(preset), seed=i), folder / f"{role}.safetensors")


def _dmd_trainer(out: Path, weights: Path, *overrides: str):
    from model import objective_registry
    from trainer.objective import objective_defaults
    from trainer.trainer import Trainer
    from utils.config import load_config

    registry = objective_registry()
    roles = [f"roles.{r}.weights={weights / f'{r}.safetensors'}" for r in ROLES]
    cfg = load_config(ROOT / "configs" / "stages" / "dmd.yaml", [*DMD, *roles, f"run.output_dir={out}", *overrides],
                      objective_defaults(registry))  # fmt: skip
    return Trainer(cfg, registry)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _dmd_state(trainer) -> dict[str, torch.Tensor]:
    """Every trainable role's gradients and updated weights (whole tensors)."""
    state = {}
    for role in trainer.trainable:
        for name, p in trainer.roles[role].named_parameters():
            state[f"{role} grad {name}"] = _full(p.grad)
            state[f"{role} weight {name}"] = _full(p)
    return state


def _dmd_job(rank: int, world: int, out: Path, sp: int) -> dict:
    trainer = _dmd_trainer(out, out.parent / "weights", f"train.sequence_parallel={sp}", "train.batch_size=1")
    history = trainer.train()
    state = _dmd_state(trainer)  # full_tensor is a collective: every rank
    if rank == 0:
        torch.save(state, out / "state.pt")
    return {"history": history, "dp": trainer.layout.dp_size, "mode": trainer.mode}


def test_dmd_iteration_under_sp_fsdp_equals_one_rank(spawned, tmp_path):
    """4 ranks as dp 2 x sp 2 (batch 1 per dp row, global batch 2), FSDP2 over all ranks, activation
    checkpointing: gradients summed over sp and averaged over dp equal one process with batch 2."""
    world, out, results = spawned
    if world != 4:
        pytest.skip("the 4-rank world runs the DMD iteration")
    result = results["dmd"]
    assert result["mode"] == "fsdp"
    single = _dmd_trainer(tmp_path, out / "weights", f"train.batch_size={result['dp']}")  # the same global batch
    hist = single.train()
    assert single.mode == "none"
    ref, got = _dmd_state(single), torch.load(out / "dmd" / "state.pt")
    assert ref.keys() == got.keys()
    for role in single.trainable:
        for kind in ("grad", "weight"):  # the gradients, and the weights after AdamW's step
            keys = [k for k in ref if k.startswith(f"{role} {kind}")]
            err = rel_err(torch.cat([got[k].flatten() for k in keys]), torch.cat([ref[k].flatten() for k in keys]))
            assert err <= TOL, (role, kind, err)
            assert max(rel_err(got[k], ref[k]) for k in keys) <= 1e-3, (role, kind)  # see the network test
    (a,), (b,) = hist, result["history"]
    assert a["loss/generator"] > 1e-6 and a["grad_norm/generator"] > 1e-6 and a.keys() == b.keys()
    for key in (k for k in a if k.startswith(("loss/", "grad_norm/"))):
        assert abs(a[key] - b[key]) <= TOL * abs(a[key]) + 1e-9, (key, a[key], b[key])


JOBS = {  # world size: (result name, job, keyword arguments); the DMD iteration covers dp 2 x sp 2
    2: [("network sp2", _network_job, {"sp": 2}), ("errors", _errors_job, {}), ("ode pairs", _ode_pairs_job, {})],
    4: [("network sp4", _network_job, {"sp": 4}), ("dmd", _dmd_job, {"sp": 2})],
}
