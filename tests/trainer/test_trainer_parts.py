"""The trainer's pieces: data loading and its errors, prompt order, SFT masking, micro-batching, lr schedule."""
import json
import math

import pytest
import torch

from arpo.algo.synthetic import random_tree
from arpo.config import load_config
from arpo.data import load_embedded_tokenizer
from arpo.model import ModelConfig, Qwen2Model
from arpo.trainer.data import DataError, PromptSampler, encode_prompt, load_rows, prompt_inputs
from arpo.build import init_weights
from arpo.trainer.optimizer import lr_factor
from arpo.trainer.sft import _segments_of_response, packed_nll, tokenize_trace
from arpo.trainer.update import micro_batches, policy_update


@pytest.fixture(scope="module")
def tok():
    return load_embedded_tokenizer()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ---------------------------------------------------------------------------------------------------- data
def test_load_rows_accepts_text_chat_and_lists(tmp_path):
    cfg = load_config()
    f = _write(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "Q: 1+1=?", "answer": 2, "data_source": "math", "id": 7}),
        json.dumps({"prompt": [{"role": "user", "content": "hi"}], "answer": ["a", "b"], "data_source": "qa"}),
    ])
    rows = load_rows(f, cfg.data)
    assert rows[0]["answer"] == "2" and rows[0]["id"] == 7
    assert rows[1]["prompt"] == [{"role": "user", "content": "hi"}] and rows[1]["answer"] == ["a", "b"]


@pytest.mark.parametrize("line, msg", [
    ('{"prompt": "x", "answer": "1"', "invalid JSON"),
    ('{"answer": "1", "data_source": "m"}', "missing field prompt"),
    ('{"prompt": "  ", "answer": "1"}', "prompt is empty"),
    ('{"prompt": [{"role": "user"}], "answer": "1"}', "chat message 0"),
    ('{"prompt": "x", "answer": null}', "'answer' must be"),
    ('{"prompt": "x", "answer": "1", "data_source": 3}', "'data_source' must be a string"),
    ('[1, 2]', "expected an object"),
])
def test_malformed_row_names_file_and_row(tmp_path, line, msg):
    f = _write(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "answer": "1", "data_source": "m"}), line])
    with pytest.raises(DataError) as err:
        load_rows(f, load_config().data)
    assert f"{f}, row 2" in str(err.value) and msg in str(err.value)


def test_empty_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="no rows"):
        load_rows(_write(tmp_path / "e.jsonl", [""]), load_config().data)
    with pytest.raises(DataError, match="no such file"):
        load_rows(str(tmp_path / "nope.jsonl"), load_config().data)


def test_custom_keys_and_long_prompts(tmp_path, tok):
    cfg = load_config(None, ["data.prompt_key=q", "data.answer_key=a", "data.max_prompt_tokens=10"])
    f = _write(tmp_path / "d.jsonl", [json.dumps({"q": "Q: 1+1=?", "a": "2", "data_source": "m"}),
                                      json.dumps({"q": "Q: 1+1+1+1+1=?", "a": "5", "data_source": "m"})])
    inputs = prompt_inputs(load_rows(f, cfg.data), tok, cfg.data)
    assert len(inputs) == 1 and inputs[0].answer == "2"  # the 16-token prompt is skipped
    assert inputs[0].prompt_ids == encode_prompt(tok, "Q: 1+1=?", cfg.data)
    assert inputs[0].prompt_ids[0] == tok.bos_token_id and tok.decode(inputs[0].prompt_ids[1:]) == "Q: 1+1=?"


def test_prompt_sampler_is_a_function_of_seed_and_step():
    items = list(range(10))
    a, b = PromptSampler(items, 4, seed=3), PromptSampler(items, 4, seed=3)
    seq = [a.batch(s) for s in range(5)]
    assert [b.batch(s) for s in reversed(range(5))][::-1] == seq  # any order, same batches
    assert sorted(seq[0] + seq[1] + seq[2][:2]) == items  # the first epoch covers every item once
    assert PromptSampler(items, 4, seed=4).batch(0) != seq[0]
    assert PromptSampler(items, 4, seed=3, shuffle=False).batch(1) == [4, 5, 6, 7]


# ---------------------------------------------------------------------------------------------------- sft
def test_sft_trains_only_on_the_models_own_tokens(tok):
    cfg = load_config()
    response = "<python>print(2)</python> <result>\n2\n</result><answer>2</answer>"
    segs = _segments_of_response(response)
    assert [t for _, t in segs] == [True, False, True] and "".join(s for s, _ in segs) == response
    ids, mask = tokenize_trace(tok, {"prompt": "Q: 1+1=?", "segments": segs}, cfg.data, 512)
    own = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert own == "<python>print(2)</python><answer>2</answer><eos>"
    assert tokenize_trace(tok, {"prompt": "Q: 1+1=?", "segments": segs}, cfg.data, 10)[0] == ids[:10]


def _tiny_model(vocab=54, seed=0):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return init_weights(Qwen2Model(cfg), seed, std=0.2)


def test_packed_nll_equals_per_sequence_mean(tok):
    model = _tiny_model()
    batch = [([1, 5, 6, 7, 8], [0, 0, 1, 1, 1]), ([1, 9, 10], [0, 1, 0]), ([1, 11, 12, 13], [0, 0, 0, 1])]
    loss, n = packed_nll(model, batch)
    assert n == 5
    want = []
    for ids, mask in batch:
        t = torch.tensor(ids)
        logp = torch.log_softmax(model.compute_logits(model(t, torch.arange(len(ids)))), -1)
        want += [-logp[j - 1, ids[j]] for j in range(1, len(ids)) if mask[j]]
    torch.testing.assert_close(loss, torch.stack(want).mean(), rtol=1e-5, atol=1e-6)


def test_packed_sequence_accuracy_equals_per_sequence_argmax(tok):
    model = _tiny_model(seed=3)
    batch = [([1, 5, 6, 7, 8], [0, 0, 1, 1, 1]), ([1, 9, 10], [0, 1, 0]), ([1, 11, 12, 13], [0, 0, 0, 1]),
             ([1, 14, 15], [0, 0, 0])]  # the last has nothing to predict: it does not count
    hits = []
    for ids, mask in batch:
        argmax = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)))).argmax(-1)
        hit = [int(argmax[j - 1]) == ids[j] for j in range(1, len(ids)) if mask[j]]
        if hit:
            hits.append(all(hit))
    loss, n, acc = packed_nll(model, batch, seq_acc=True)
    assert acc == pytest.approx(sum(hits) / len(hits))
    torch.testing.assert_close(loss, packed_nll(model, batch)[0])
    # a target that is the argmax everywhere scores 1: build it from the model's own greedy choices
    ids = [1, 5]
    for _ in range(4):
        ids.append(int(model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids))))[-1].argmax()))
    assert packed_nll(model, [(ids, [0, 0, 1, 1, 1, 1])], seq_acc=True)[2] == 1.0


# ---------------------------------------------------------------------------------------------------- update
def test_micro_batches_accumulate_to_the_whole_minibatch_gradient():
    trees = [random_tree(s, vocab=54, n_leaves=4, seg_len=(1, 6)) for s in range(4)]
    grads = {}
    assert len(micro_batches(trees, 10**6)) == 1 and len(micro_batches(trees, 24)) > 1
    for tokens in (10**6, 24):  # one micro-batch vs several
        model = _tiny_model(seed=1)
        cfg = load_config(None, ["train.batch_prompts=4", "train.mini_batch_prompts=4",
                                 f"train.micro_batch_tokens={tokens}", "optim.lr=1e-3"])
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, read the gradients
        m = policy_update(model, trees, cfg, opt, temperature=cfg.rollout.temperature)
        grads[tokens] = ([p.grad.clone() for p in model.parameters()], m)
    (g1, m1), (g2, m2) = grads[10**6], grads[24]
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-4, abs=1e-7)
    assert any(a.abs().max() > 0 for a in g1)


def _unfused_token_loss(hidden, weight, targets, loss_fn, temperature=1.0):
    """The reference for `linear_token_loss` in the trainer: statistics first, the loss of all tokens after."""
    from arpo_kernels import linear_logprobs_entropy
    lp, ent = linear_logprobs_entropy(hidden, weight, targets, temperature=temperature)
    return loss_fn(lp, ent, 0, lp.numel()), lp.detach(), ent.detach()


@pytest.mark.parametrize("extra", [["algo.entropy_coef=0.05", "algo.kl_coef=0.1"], ["algo.aepo_entropy_clip=true"],
                                   ["algo.aepo_entropy_advantage=true", "algo.entropy_coef=0.05"]])
def test_fused_loss_equals_the_unfused_update(monkeypatch, extra):
    """The trainer's loss through `linear_token_loss` (gradient in the forward, per chunk) gives the loss, the
    metrics and the gradients of the statistics-then-loss path, with the entropy bonus, KL and AEPO options; AEPO's
    entropy advantage (a z-score over the micro-batch) keeps the unfused path, and must give the same too."""
    import arpo.trainer.update as update
    trees = [random_tree(s, vocab=54, n_leaves=4, seg_len=(1, 6)) for s in range(4)]
    cfg = load_config(None, ["train.batch_prompts=4", "train.mini_batch_prompts=4", "train.micro_batch_tokens=40",
                             "rollout.temperature=0.9"] + extra)
    out = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(update, "linear_token_loss", _unfused_token_loss)
        model = _tiny_model(seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        m = policy_update(model, trees, cfg, opt, ref_model=_tiny_model(seed=2), temperature=0.9)
        out[fused] = ([p.grad.clone() for p in model.parameters()], m)
    (g1, m1), (g2, m2) = out[True], out[False]
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m1[k] == pytest.approx(m2[k], rel=1e-5, abs=1e-7), k
    assert any(a.abs().max() > 0 for a in g1)


def test_lr_schedule():
    assert [lr_factor(s, 2, 10, "constant", 0.0) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 2, 10, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 2, 10, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, 10, "cosine", 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_bf16_parameters_get_fp32_master_weights():
    from arpo.config import OptimConfig
    from arpo.trainer.optimizer import MasterWeightAdamW, build_optimizer

    model = _tiny_model().to(torch.bfloat16)
    opt, sched = build_optimizer(model, OptimConfig(lr=1e-5, weight_decay=0.0), 10)
    assert isinstance(opt, MasterWeightAdamW)
    w = model.norm.weight  # all ones: a 1e-5 step is far below bf16 resolution there
    start = w.detach().float().clone()
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    idx = [i for i, p in enumerate(opt.model_params) if p is w][0]
    torch.testing.assert_close(opt.masters[idx], start - 3e-5, rtol=0, atol=1e-6)  # kept in fp32
    assert torch.equal(w.float(), opt.masters[idx].to(torch.bfloat16).float())  # written back in place
    fresh = _tiny_model().to(torch.bfloat16)
    opt2, _ = build_optimizer(fresh, OptimConfig(lr=1e-5, weight_decay=0.0), 10)
    opt2.load_state_dict(opt.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(opt.masters, opt2.masters))
    assert torch.equal(fresh.norm.weight, w)


def _tiny_sft_setup(tmp_path, *extra: str):
    """(model, tokenizer, config) of a one-layer embedded model and a 60-step SFT config."""
    from arpo.build import base_model_path, load_policy

    over = ["model.embedded_hidden_size=32", "model.embedded_layers=1", "model.embedded_intermediate_size=48",
            "model.device=cpu", f"train.run_dir={tmp_path}", "sft.steps=60", "sft.batch_size=2", *extra]
    cfg = load_config(None, over)
    model, tok = load_policy(base_model_path(cfg), cfg.model)
    return model, tok, cfg


def test_sft_stops_early_at_the_loss_target(tmp_path):
    from arpo.trainer.sft import run_sft

    model, tok, cfg = _tiny_sft_setup(tmp_path, "data.embedded_train_size=8", "sft.max_tokens=24",
                                      "sft.stop_accuracy=null")
    assert run_sft(model, tok, cfg, progress=False, stop_loss=100.0)["steps"] == 50  # met at once: 50-step minimum
    assert run_sft(model, tok, cfg, progress=False, stop_loss=None)["steps"] == 60
    with pytest.raises(ValueError, match="stop_accuracy"):
        run_sft(model, tok, cfg, progress=False, stop_accuracy=1.5)


def test_sft_stops_early_at_the_sequence_accuracy_target(tmp_path):
    from arpo.trainer.metrics import MetricsLogger, read_metrics
    from arpo.trainer.sft import run_sft

    model, tok, cfg = _tiny_sft_setup(tmp_path, "data.embedded_train_size=2", "sft.max_tokens=16", "sft.lr=3e-2")
    with MetricsLogger(str(tmp_path / "sft")) as logger:
        out = run_sft(model, tok, cfg, logger, progress=False, stop_accuracy=0.5)
    rows = read_metrics(str(tmp_path / "sft"))
    assert len(rows) == out["steps"] and all(0.0 <= r["seq_accuracy"] <= 1.0 for r in rows)
    ema = 0.0
    for i, r in enumerate(rows):  # it stopped at the first step (>= 50) whose running accuracy reached 0.5
        ema = r["seq_accuracy"] if i == 0 else 0.9 * ema + 0.1 * r["seq_accuracy"]
        assert (i + 1 >= 50 and ema >= 0.5) == (i + 1 == len(rows))
