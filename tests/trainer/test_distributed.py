"""FSDP2 data parallelism is exact (issue 10): 2 gloo ranks, each with half of the prompt groups, compute the same
gradient, grad norm and AdamW update as one process on the whole batch (fp32, 1e-5), for every attribution mode ×
aggregation; the checkpoint they write loads in transformers with the same logits, and its DCP shards resume on a
different number of ranks (2 → 1, sharded and plain) to give the same next step as an uninterrupted run.

CPU only (gloo). Ranks are spawned with torch.multiprocessing; results come back through files in tmp_path.
"""
from __future__ import annotations

import math
import os
import random
import socket

import pytest
import torch

from arpo.algo import pack_trees
from arpo.algo.advantages import AGGREGATIONS, MODES
from arpo.algo.synthetic import random_tree
from arpo.model import AttentionContext, Qwen2Model
from arpo.model.config import ModelConfig
from arpo.trainer import distributed as D
from arpo.trainer.update import micro_batches
from arpo_kernels.policy_loss import PolicyLossWeights, segmented_policy_loss_from_hidden

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available() and D.HAS_FSDP2),
    reason="needs torch.distributed with the gloo backend and FSDP2 (torch.distributed.fsdp.fully_shard)")

V = 97
HF_CONFIG = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6)
PROMPTS = [[5, 17, 3], [96, 41, 0, 8, 2]]
CASES = [(m, a) for m in MODES for a in AGGREGATIONS]
MICRO_TOKENS = 60  # small enough for several micro-batches, uneven across ranks
TOL = dict(rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ the step
def make_trees(seed: int, n: int = 8) -> list:
    trees = [random_tree(seed * 100 + i, vocab=V, n_leaves=3 + i % 3, reward_levels=3) for i in range(n)]
    rng = random.Random(seed)
    for t in trees:  # behaviour log-probs near the (almost uniform) random model's, so the clips are visited
        for s in t.segments:
            s.logprobs = [-math.log(V) + rng.uniform(-0.3, 0.3) for _ in s.token_ids]
    return trees


def micro_groups(trees: list) -> list[list]:
    return micro_batches(trees, MICRO_TOKENS)


def train_step(model, opt, trees, mode, agg) -> dict:
    """The trainer's update on this rank's trees, with the distributed rules of arpo.trainer.distributed."""
    opt.zero_grad(set_to_none=True)
    w = D.global_loss_weights(pack_trees(trees), mode, agg)
    groups = micro_groups(trees)
    n_micro = int(D.max_across_ranks(len(groups)))
    k = 0
    for i in range(n_micro):
        micro = pack_trees(groups[i]) if i < len(groups) else None
        if micro is None or micro.targets.numel() == 0:
            D.idle_micro_step(model)
            continue
        m = micro.targets.numel()
        hidden = model(micro.input_ids, micro.position_ids, AttentionContext.tree(micro.attention_mask()))
        loss, _ = segmented_policy_loss_from_hidden(hidden, model.lm_head_weight, micro.targets,
                                                    micro.old_logprobs, PolicyLossWeights(*(t[k:k + m] for t in w)),
                                                    index=micro.pred_index, clip_low=0.2, clip_high=0.28)
        loss.backward()
        k += m
    norm = D.clip_grad_norm(model, math.inf)
    D.clip_grad_norm(model, norm / 2)  # active clipping: every rank must scale by the same global norm
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    opt.step()
    return {"norm": norm, "grads": grads, "n_micro": len(groups)}


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def new_policy(ckpt: str):
    torch.manual_seed(0)
    model = Qwen2Model.from_pretrained(ckpt, dtype=torch.float32)
    return model


def new_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-6, weight_decay=0.01)


# ------------------------------------------------------------------------------------------------ ranks
def _rank_main(rank: int, world: int, port: int, task: str, ckpt: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    D.init_distributed("cpu")
    try:
        TASKS[task](ckpt, out)
    finally:
        D.destroy_distributed()


def rollout(model) -> list:
    """Greedy decoding with the engine on `model`'s parameters (a stand-in for the tree rollout)."""
    from arpo.engine import LLMEngine, SamplingParams

    engine = LLMEngine(model, block_size=4, num_blocks=32, max_model_len=32, decode_graphs="off")
    outs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=5))
    return [(o.token_ids, o.logprobs) for o in outs]


def _task_update(ckpt: str, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from arpo.trainer.dist_checkpoint import gather_full_state_dict, save_step

    mine = D.shard_prompts(make_trees(1), D.rank(), D.world_size())
    for ci, (mode, agg) in enumerate(CASES):
        model = D.shard_model(new_policy(ckpt))
        opt = new_optimizer(model)
        if ci == 0:  # the rollout sees the full weights inside full_parameters, the shards again after it
            with D.full_parameters(model):
                assert not any(isinstance(p, DTensor) for p in model.parameters())
                decoded = rollout(model)
            assert all(isinstance(p, DTensor) for p in model.parameters())
        res = train_step(model, opt, mine, mode, agg)
        if ci == 0:
            res["rollout"] = decoded
            r = D.rank()
            res["metrics"] = D.all_reduce_metrics({"acc": float(r), "leaves": 2 + r, "gap": 10.0 * r, "tag": "x"},
                                                  weight=1 + r, sums=("leaves",), maxes=("gap",))
        n_micro = D.all_reduce_metrics({"n": res["n_micro"]}, maxes=("n",))
        res["micro_per_rank"] = D.sum_across_ranks([res["n_micro"] * (D.rank() == r) for r in range(2)])
        res["params"] = gather_full_state_dict(model)
        assert n_micro["n"] >= res["n_micro"]
        if ci == 0:
            res["ckpt"] = save_step(os.path.join(out, "run"), 1, model, opt, state={"note": "test"})
        if D.is_main():
            torch.save(res, os.path.join(out, f"case{ci}.pt"))


def _task_resume(ckpt: str, out: str) -> None:
    from arpo.trainer.dist_checkpoint import gather_full_state_dict, load_step

    model = D.shard_model(new_policy(ckpt))
    opt = new_optimizer(model)
    state = load_step(os.path.join(out, "run", "step_000001"), model, opt)
    mode, agg = CASES[0]
    res = train_step(model, opt, D.shard_prompts(make_trees(2), D.rank(), D.world_size()), mode, agg)
    res["params"] = gather_full_state_dict(model)
    res["step"] = state.step
    if D.is_main():
        torch.save(res, os.path.join(out, "resumed.pt"))


TASKS = {"update": _task_update, "resume": _task_resume}


def spawn(world: int, task: str, ckpt: str, out: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank_main, args=(world, port, task, ckpt, out), nprocs=world, join=True)


# ------------------------------------------------------------------------------------------------ the test
@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    transformers = pytest.importorskip("transformers")  # imported here, not in the spawned ranks (slow import)
    path = str(tmp_path_factory.mktemp("hf_tiny"))
    torch.manual_seed(3)
    cfg = transformers.Qwen2Config(**HF_CONFIG)
    transformers.Qwen2ForCausalLM(cfg).float().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two_rank_run(hf_checkpoint, tmp_path_factory):
    """One 2-rank run of every case (results in files), shared by the tests below."""
    out = str(tmp_path_factory.mktemp("two_ranks"))
    spawn(2, "update", hf_checkpoint, out)
    return out


def test_two_ranks_equal_one_process_then_resume_on_one(hf_checkpoint, two_rank_run):
    out = two_rank_run
    trees = make_trees(1)
    for ci, (mode, agg) in enumerate(CASES):
        got = torch.load(os.path.join(out, f"case{ci}.pt"), weights_only=False)
        model = new_policy(hf_checkpoint)
        opt = new_optimizer(model)
        want = train_step(model, opt, trees, mode, agg)
        msg = f"{mode}/{agg}"
        assert got["norm"] == pytest.approx(want["norm"], rel=1e-5), msg
        assert want["norm"] > 1e-3, msg  # not a comparison between two zeros
        for name, g in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, **TOL, msg=f"{msg} grad {name}")
        for name, p in model.state_dict().items():
            torch.testing.assert_close(got["params"][name], p, **TOL, msg=f"{msg} {name}")
        if ci == 0:
            reference, ref_opt = model, opt
            assert len(set(got["micro_per_rank"])) > 1, "the ranks should need different micro-batch counts"
            assert got["metrics"] == pytest.approx({"acc": 2 / 3, "leaves": 5, "gap": 10.0, "tag": "x"})
            for (ids, lps), (want_ids, want_lps) in zip(got["rollout"], rollout(new_policy(hf_checkpoint))):
                assert ids == want_ids
                torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lps), **TOL)

    # The consolidated checkpoint: transformers loads it and computes our updated model's logits.
    import transformers

    ckpt = os.path.join(out, "run", "step_000001")
    hf = transformers.Qwen2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 3, 96, 41, 0, 8]])
    with torch.no_grad():
        want_logits = reference.compute_logits(reference(ids[0], torch.arange(ids.shape[1])))
        torch.testing.assert_close(hf(input_ids=ids).logits[0], want_logits, **TOL)

    # Resume the 2-rank DCP shards on 1 rank and take step 2; the uninterrupted run takes the same step.
    mode, agg = CASES[0]
    want = train_step(reference, ref_opt, make_trees(2), mode, agg)
    spawn(1, "resume", hf_checkpoint, out)
    got = torch.load(os.path.join(out, "resumed.pt"), weights_only=False)
    assert got["step"] == 1
    for name, p in reference.state_dict().items():
        torch.testing.assert_close(got["params"][name], p, **TOL, msg=f"resumed {name}")


def test_resume_into_plain_model_and_consolidate_offline(hf_checkpoint, two_rank_run, tmp_path):
    """The same DCP shards load without any process group into an unsharded model, and consolidate offline."""
    from arpo.trainer.dist_checkpoint import consolidate_dcp, load_sharded

    out = two_rank_run
    got = torch.load(os.path.join(out, "case0.pt"), weights_only=False)
    dcp_dir = os.path.join(out, "run", "step_000001", "dcp")
    model = new_policy(hf_checkpoint)
    opt = new_optimizer(model)
    load_sharded(dcp_dir, model, opt)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, got["params"][name], rtol=0, atol=0)
    assert all(s["step"] == 1 for s in opt.state.values()) and len(opt.state) == len(list(model.parameters()))
    export = str(tmp_path / "export")
    consolidate_dcp(dcp_dir, os.path.join(out, "run", "step_000001"), export)
    again = Qwen2Model.from_pretrained(export, dtype=torch.float32)
    for name, p in again.state_dict().items():
        torch.testing.assert_close(p, got["params"][name], rtol=0, atol=0)


def test_batch_split_rules():
    prompts = list(range(12))
    shards = [D.shard_prompts(prompts, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == prompts
    # local mini-batch j of every rank together = global mini-batch j
    local_b, local_mb = D.local_batch_sizes(12, 6, 3)
    assert (local_b, local_mb) == (4, 2)
    for j in range(2):
        assert sorted(p for s in shards for p in s[j * local_mb:(j + 1) * local_mb]) == prompts[j * 6:(j + 1) * 6]
    with pytest.raises(ValueError, match="not divisible by the number of ranks"):
        D.local_batch_sizes(12, 5, 2)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        D.shard_prompts(prompts, 0, 5)
    with pytest.raises(ValueError, match="out of range"):
        D.shard_prompts(prompts, 3, 3)


def test_single_process_helpers_are_identities():
    assert not D.is_initialized() and D.is_main() and D.world_size() == 1
    trees = make_trees(4, n=2)
    batch = pack_trees(trees)
    for mode in MODES:
        for agg in AGGREGATIONS:
            for a, b in zip(D.global_loss_weights(batch, mode, agg), batch.loss_weights(mode, agg)):
                assert torch.equal(a, b)
    m = {"reward": 0.5, "leaves": 3, "name": "x"}
    assert D.all_reduce_metrics(m, weight=2.0, sums=("leaves",)) == m
    assert D.max_across_ranks(3) == 3.0
    with pytest.raises(RuntimeError, match="init_distributed"):  # no process group: sharding must say so
        D.shard_model(torch.nn.Module())
    with D.full_parameters(torch.nn.Linear(2, 2)) as inner:  # unsharded: a no-op
        assert isinstance(inner, torch.nn.Linear)


def test_torchrun_argv():
    one = D.torchrun_argv(4, ["train", "cfg.yaml", "train.steps=3"])
    assert one[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node=4", "--standalone"]
    assert one[-5:] == ["-m", "arpo", "train", "cfg.yaml", "train.steps=3"]
    many = D.torchrun_argv(8, ["train"], nnodes=2, rdzv_endpoint="node0:29400")
    assert "--nnodes=2" in many and "--rdzv_endpoint=node0:29400" in many and "--standalone" not in many
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        D.torchrun_argv(8, ["train"], nnodes=2)
    with pytest.raises(ValueError, match="nproc"):
        D.torchrun_argv(0, ["train"])


def test_cpu_job_shards_on_the_cpu_even_where_cuda_is_visible(monkeypatch):
    """A gloo job shards over a CPU mesh whether or not the machine has GPUs (FSDP2's own default mesh picks CUDA
    when it is visible, and a 2-rank CPU job on a 1-GPU machine failed in cuda.set_device(1))."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        # what FSDP2's default mesh asks (torch 2.11-2.13): this process now looks like a machine with a GPU
        monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))
        model = D.shard_model(Qwen2Model(ModelConfig.from_dict(dict(HF_CONFIG, model_type="qwen2",
                                                                    max_position_embeddings=64))))
        weights = [p for p in model.parameters() if isinstance(p, DTensor)]
        assert weights and {p.device_mesh.device_type for p in weights} == {"cpu"}
    finally:
        dist.destroy_process_group()
