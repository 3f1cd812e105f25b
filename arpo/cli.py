"""The `arpo` command.

    arpo train                                   # the embedded default: tiny model, SFT cold start, ARPO, on CPU
    arpo train algo=grpo                         # the GRPO baseline on the same task (run dir runs/embedded-grpo)
    arpo train algo=dapo                         # DAPO (clip-higher, dynamic sampling; runs/embedded-dapo)
    arpo train my.yaml model.path=/models/qwen3b rollout.leaves=8
    arpo train --print-config                    # every field with its help text, as loadable YAML
    arpo train --resume                          # continue from the newest valid checkpoint in train.run_dir
    arpo train --overwrite                       # start again in a used run dir (deletes the earlier run)
    arpo sft [config.yaml] [key=value ...]       # cold-start SFT only; writes RUN_DIR/sft_model
    arpo eval CHECKPOINT [config.yaml] [key=value ...] [--samples K --temperature T]
    arpo plot RUN_DIR [RUN_DIR ...]              # PNG curves (several runs overlaid)
    arpo rollout [config.yaml] [key=value ...] [--toy] [--n N] [--out trees.jsonl]   # one rollout, as trees
    arpo serve CHECKPOINT [--host H] [--port P] [--tools python,search] [key=value ...]   # OpenAI-compatible API
    arpo chat CHECKPOINT [--tools python,search] [key=value ...]   # talk to a checkpoint in the terminal
    arpo bench token-stats [--device cuda] [--quick]

Each subcommand lives in its own small function; heavy imports happen inside them so `arpo --help` is instant.
A bad config, data file or checkpoint prints one line naming the problem and exits with status 2. A run
directory holds one run: a fresh `arpo train` / `arpo sft` in a used one is refused (see arpo.trainer.run_dir).
SIGTERM / Ctrl-C stop training after the current step (checkpointed) with status 143 / 130.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

EMBEDDED_RUN_DIR = "runs/embedded"


def _cmd_bench(args: argparse.Namespace) -> int:
    from arpo.bench import registry

    if args.list or not args.workload:
        for name, doc in registry.describe().items():
            print(f"{name:20s} {doc}")
        return 0
    return registry.run_cli(args.workload, device=args.device, quick=args.quick, out=args.out, only=args.only)


# ---------------------------------------------------------------------------------------------------- config
def split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`[config.yaml] [section.key=value ...]` → (path or None, overrides)."""
    path, overrides = None, []
    for i, item in enumerate(items):
        if i == 0 and "=" not in item:
            path = item
        else:
            overrides.append(item)
    return path, overrides


def load_cli_config(items: list[str], extra: list[str] = ()):
    from arpo.config import ConfigError, load_config

    path, overrides = split_config_args(items)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]!r}: expected section.key=value (only the first argument may be a config file)")
    overrides = list(overrides) + list(extra)
    cfg = load_config(path, overrides)
    if cfg.algo.name != "arpo" and cfg.train.run_dir == EMBEDDED_RUN_DIR and \
            not any(o.startswith("train.run_dir=") for o in overrides):
        cfg.train.run_dir = f"{EMBEDDED_RUN_DIR}-{cfg.algo.name}"  # baselines next to, not over, the ARPO run
    return cfg


def _fail(exc: Exception) -> int:
    print(f"arpo: error: {exc}", file=sys.stderr)
    return 2


def _user_errors():
    from arpo.config import ConfigError
    from arpo.trainer.data import DataError

    from arpo.trainer.checkpoint import CheckpointError

    return (ConfigError, DataError, FileNotFoundError, CheckpointError)


# ---------------------------------------------------------------------------------------------------- train
def _torchrun(args: argparse.Namespace) -> int:
    """`arpo train --nproc N ...`: the same command, N times, under torchrun (one node, private rendezvous)."""
    import subprocess

    from arpo.trainer.distributed import torchrun_argv

    from arpo.trainer.signals import SIGNALS, exit_status

    rest = ["train", *args.args]
    if args.resume is not None:
        rest += ["--resume", args.resume]
    if args.overwrite:
        rest.append("--overwrite")
    # torchrun in its own session (and its ranks in theirs): a signal reaches the ranks once, through torchrun,
    # which passes it on to every rank and gives them 30 s to checkpoint and exit, whether it came from a scheduler
    # (SIGTERM to this process) or a terminal (Ctrl-C). A second Ctrl-C goes straight to the ranks: they stop at once.
    proc = subprocess.Popen(torchrun_argv(args.nproc, rest), start_new_session=True)
    got: list[int] = []

    def forward(signum, frame):
        got.append(signum)
        if len(got) > 1 and signum != signal.SIGINT:
            return  # a repeated SIGTERM: the ranks are stopping already
        for pid in ([proc.pid] if len(got) == 1 else _children(proc.pid) or [proc.pid]):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    previous = {sig: signal.signal(sig, forward) for sig in SIGNALS}
    try:
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return exit_status(got[0]) if got else rc


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; [] elsewhere or once it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _cmd_train(args: argparse.Namespace) -> int:
    from arpo.config import config_to_yaml

    if args.nproc is not None and not args.print_config:
        if args.nproc < 1:
            return _fail(ValueError(f"--nproc must be >= 1, got {args.nproc}"))
        if "WORLD_SIZE" in os.environ:
            return _fail(ValueError("--nproc under torchrun: launch with one or the other"))
        from arpo.trainer.distributed import local_batch_sizes

        try:  # check the config here, once, rather than N times under torchrun
            cfg = load_cli_config(list(args.args))
            local_batch_sizes(cfg.train.batch_prompts, cfg.train.mini_batch_prompts, args.nproc)
        except (*_user_errors(), ValueError) as exc:
            return _fail(exc)
        return _torchrun(args)
    items = list(args.args)
    resume = args.resume
    if resume is not None and "=" in resume:  # `--resume key=value`: a bare --resume followed by an override
        items.append(resume)
        resume = "latest"
    try:
        cfg = load_cli_config(items)
        if args.print_config:
            print(config_to_yaml(cfg))
            return 0
        if resume is not None:
            cfg.train.resume = resume
        from arpo.trainer.trainer import Trainer

        trainer = Trainer(cfg, overwrite=args.overwrite)
    except _user_errors() as exc:
        return _fail(exc)
    from arpo.trainer.signals import exit_status

    try:
        summary = trainer.train()
    except KeyboardInterrupt as exc:  # a second signal: stop now (no checkpoint of the step in flight)
        print(f"arpo: {exc or 'interrupted'}", file=sys.stderr)
        return exit_status(getattr(exc, "signum", signal.SIGINT))
    finally:
        trainer.close()
    if _rank0():
        _print_outputs(cfg.train.run_dir, summary)
    return exit_status(summary.get("stopped_by_signal"))


def _rank0() -> bool:
    """Not a torchrun worker other than rank 0 (which print nothing)."""
    return os.environ.get("RANK", "0") == "0"


def _print_outputs(run_dir: str, summary: dict) -> None:
    plots = []
    try:
        from arpo.trainer.plot import plot_run

        plots = plot_run([run_dir])
    except ImportError as exc:
        print(f"(no plots: {exc})")
    print(f"run directory: {run_dir}  ({summary.get('wall_s', 0):.0f} s of RL)")
    if summary.get("checkpoint"):
        print(f"checkpoint:    {summary['checkpoint']}  (Hugging Face format + tokenizer)")
    if plots:
        print(f"plots:         {os.path.dirname(plots[0])}/  (overview.png and {len(plots) - 1} more)")
    print(f"metrics:       {os.path.join(run_dir, 'metrics.jsonl')}")


# ---------------------------------------------------------------------------------------------------- sft
def _cmd_sft(args: argparse.Namespace) -> int:
    try:
        cfg = load_cli_config(list(args.args))
        if cfg.sft.steps <= 0:
            from arpo.config import ConfigError

            raise ConfigError("sft.steps must be > 0 for `arpo sft`")
        from arpo.config import check_paths
        from arpo.build import base_model_path, load_policy, set_threads
        from arpo.trainer.metrics import MetricsLogger
        from arpo.trainer.sft import run_sft
        from arpo.trainer.run_dir import check_sft_run_dir
        from arpo.trainer.trainer import SFT_MODEL_DIR, seed_everything

        check_paths(cfg)
        out = args.out or os.path.join(cfg.train.run_dir, SFT_MODEL_DIR)
        check_sft_run_dir(cfg.train.run_dir, out, overwrite=args.overwrite)
        set_threads(cfg.train.threads)
        seed_everything(cfg.train.seed)
        model, tok = load_policy(base_model_path(cfg), cfg.model)
        with MetricsLogger(os.path.join(cfg.train.run_dir, "sft")) as logger:
            last = run_sft(model, tok, cfg, logger, progress=cfg.log.progress_bar)
    except _user_errors() as exc:
        return _fail(exc)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"SFT: {last['steps']} steps, final loss {last['loss']:.4f}, {last['wall_s']:.0f} s; model: {out}")
    print(f"evaluate it with: arpo eval {out}")
    return 0


# ---------------------------------------------------------------------------------------------------- eval
def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    try:
        cfg = _eval_config(args)
        from arpo.config import check_paths
        from arpo.build import build_engine, build_reward, build_tools, load_policy, set_threads
        from arpo.trainer.data import DataError, eval_rows, prompt_inputs
        from arpo.trainer.evaluate import evaluate

        check_paths(cfg)
        set_threads(cfg.train.threads)
        model, tok = load_policy(args.checkpoint, cfg.model)
        rows = eval_rows(cfg)
        tools = build_tools(cfg, tok)
        try:
            prompts = prompt_inputs(rows, tok, cfg.data, tools.protocol)
            if not prompts:
                raise DataError("no held-out prompts: set data.eval_files")
        except BaseException:
            tools.close()
            raise
    except _user_errors() as exc:
        return _fail(exc)
    k, temperature = cfg.train.eval_sampling(args.samples, args.temperature)
    try:
        engine = build_engine(model, tok, cfg, min(len(prompts), 64) * k + 64)
        m = evaluate(engine, tools, build_reward(cfg), prompts, cfg, samples=k, temperature=temperature)
    finally:
        tools.close()
    if args.json:
        print(json.dumps(m))
    else:
        kk = m["samples"]
        print(f"{args.checkpoint}: {m['questions']} questions, {kk} sample(s) each, temperature {temperature:g}")
        print(f"  accuracy {100 * m['accuracy']:.1f}%   pass@{kk} {100 * m[f'pass@{kk}']:.1f}%   "
              f"format ok {100 * m['format_ok']:.1f}%   tool calls/question {m['tool_calls']:.2f}   "
              f"mean reward {m['reward']:.3f}   ({m['time_s']:.0f} s)")
    return 0


def _eval_config(args):
    """The config given, else the one the checkpoint was trained with, else the embedded default."""
    from arpo.config import ConfigError, apply_overrides, config_from_dict, validate
    from arpo.trainer.checkpoint import STATE_FILE

    if not os.path.isdir(args.checkpoint):
        raise ConfigError(f"{args.checkpoint}: no such checkpoint directory")
    path, overrides = split_config_args(list(args.args))
    state = os.path.join(args.checkpoint, STATE_FILE)
    if path is None and os.path.isfile(state):
        import json

        with open(state, encoding="utf-8") as f:
            saved = json.load(f).get("config")
        if saved:
            cfg = config_from_dict(saved)
            cfg.train.resume = None
            cfg = validate(apply_overrides(cfg, overrides))
            cfg.model.path = args.checkpoint
            return cfg
    cfg = load_cli_config([path] + overrides if path else overrides)
    cfg.model.path = args.checkpoint
    return cfg


# ---------------------------------------------------------------------------------------------------- rollout
def _cmd_rollout(args: argparse.Namespace) -> int:
    """One rollout of the config's held-out prompts, printed as trees (and saved as JSONL with --out)."""
    import json

    try:
        cfg = load_cli_config(list(args.args))
        from arpo.build import (base_model_path, build_engine, build_reward, build_rollout, build_tools,
                                load_policy, resolve_device, set_threads)
        from arpo.config import check_paths
        from arpo.trainer.data import DataError, eval_rows, prompt_inputs

        check_paths(cfg)
        set_threads(cfg.train.threads)
        if args.toy:
            from arpo.rollout.toy_policy import tool_chain_policy

            model, tok = tool_chain_policy("python", device=resolve_device(cfg.model.device),
                                           chain_kw={"eps": 1e-4, "p_eos": 0.05}, noise=5e-4)
        else:
            model, tok = load_policy(base_model_path(cfg), cfg.model)
        rows = eval_rows(cfg)
        tools = build_tools(cfg, tok)
        try:
            prompts = prompt_inputs(rows, tok, cfg.data, tools.protocol)[: args.n]
            if not prompts:
                raise DataError("no prompts: set data.eval_files (or data.train_files)")
        except BaseException:
            tools.close()
            raise
    except _user_errors() as exc:
        return _fail(exc)
    try:
        engine = build_engine(model, tok, cfg, len(prompts) * cfg.rollout.leaves + 8)
        result = build_rollout(engine, tools, build_reward(cfg), cfg).run(prompts, seed=cfg.train.seed)
    finally:
        tools.close()
    trees, s = result.trees, result.stats
    for tree in trees[: args.show]:
        print(tree.render(decode=tok.decode, max_chars=args.max_chars))
        print()
    leaves = sum(len(t.leaves) for t in trees)
    print(f"{len(trees)} trees, {leaves} leaves, {sum(t.metadata['branches'] for t in trees)} branches, "
          f"{s['tool_calls']} tool calls, prefill {s['prefill_tokens']} / decode {s['decode_tokens']} tokens, "
          f"peak {s['peak_blocks']} KV blocks, {s['wall_s']:.2f} s; mean reward "
          f"{sum(r for t in trees for r in t.rewards()) / max(leaves, 1):.3f}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for tree in trees:
                f.write(json.dumps(tree.to_dict()) + "\n")
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------- serve, chat
def _tool_list(text: str | None) -> list[str] | None:
    """`--tools python,search` → ['python', 'search'] (None: no tools, no agent mode)."""
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError("--tools: name at least one tool (python, search)")
    return names


def _serve_parts(args: argparse.Namespace, max_seqs: int):
    """(config, engine process client) for `serve` and `chat`: the checkpoint's own config (or the one given) with
    the overrides, as `arpo eval` reads it; the engine and tools are built in the engine process, whose start-up
    errors (a bad checkpoint, an unknown tool) are raised here."""
    from arpo.serve.engine_client import EngineClient

    cfg = _eval_config(args)
    return cfg, EngineClient(args.checkpoint, cfg, max_seqs, _tool_list(args.tools))


def _cmd_serve(args: argparse.Namespace) -> int:
    from arpo.serve.settings import from_arguments

    try:
        from arpo.serve.app import Server
        from arpo.serve.server import run_forever
    except ImportError as exc:  # pragma: no cover - the serve extra is missing
        return _fail(RuntimeError(f"{exc}; install the server with: pip install 'arpo[serve]'"))
    try:
        settings = from_arguments(args)
        cfg, engine = _serve_parts(args, settings.max_seqs)
    except (*_user_errors(), ValueError) as exc:
        return _fail(exc)
    name = settings.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    run_forever(Server(engine, cfg.data, settings, name))
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from arpo.serve.chat import ChatSession
    from arpo.serve.settings import ChatSettings, from_arguments

    try:
        settings = from_arguments(args, ChatSettings)
        cfg, engine = _serve_parts(args, 4)
    except (*_user_errors(), ValueError) as exc:
        return _fail(exc)
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # pragma: no cover - not on every platform
        pass
    try:
        ChatSession(engine, cfg.data, settings).run()
    finally:
        engine.close()
    return 0


# ---------------------------------------------------------------------------------------------------- plot
def _cmd_plot(args: argparse.Namespace) -> int:
    from arpo.trainer.metrics import METRICS_FILE

    for d in args.run_dirs:
        if not os.path.isfile(os.path.join(d, METRICS_FILE)):
            print(f"arpo: error: {d}: no {METRICS_FILE} (not a run directory?)", file=sys.stderr)
            return 2
    from arpo.trainer.plot import plot_run

    files = plot_run(args.run_dirs, out_dir=args.out)
    for f in files:
        print(f)
    return 0


# ---------------------------------------------------------------------------------------------------- parser
def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [section.key=value ...]",
                   help="optional YAML config (default: the embedded task), then overrides such as "
                        "rollout.leaves=8 or algo=grpo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arpo", description="ARPO: train and decode tool-using LLM agents with entropy-adaptive tree rollouts."
    )
    from arpo import __version__

    parser.add_argument("--version", action="version", version=f"arpo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="RL training (ARPO, GRPO or DAPO); no arguments = the embedded CPU demo",
                           description="Train a policy with ARPO (or GRPO: algo=grpo, DAPO: algo=dapo). Without a "
                                       "config file: the "
                                       "embedded task (tiny model created in runs/embedded, SFT cold start, ARPO).")
    _config_args(train)
    train.add_argument("--print-config", action="store_true", help="print the full config (YAML with help) and exit")
    train.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                       help="continue the run: from the newest checkpoint in train.run_dir, or from CHECKPOINT")
    train.add_argument("--overwrite", action="store_true",
                       help="start fresh even if train.run_dir holds an earlier run: its files are deleted first "
                            "(without it, a used run dir is an error)")
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="data-parallel over N local processes (GPUs): re-runs itself under torchrun with FSDP2 "
                            "(same as `torchrun --standalone --nproc_per_node=N -m arpo train ...`)")
    train.set_defaults(func=_cmd_train)

    sft = sub.add_parser("sft", help="cold-start SFT on tool-use traces (loss on the model's own tokens only)")
    _config_args(sft)
    sft.add_argument("--out", default=None, help="output directory (default: RUN_DIR/sft_model)")
    sft.add_argument("--overwrite", action="store_true",
                     help="replace an earlier SFT run's metrics (RUN_DIR/sft) and model (--out) instead of refusing")
    sft.set_defaults(func=_cmd_sft)

    ev = sub.add_parser("eval", help="held-out accuracy, tool calls per question and pass@k of a checkpoint")
    ev.add_argument("checkpoint", help="a checkpoint directory (Hugging Face format + tokenizer)")
    _config_args(ev)
    ev.add_argument("--samples", type=int, default=None, help="samples per question, k of pass@k "
                                                              "(default train.eval_samples; 1 when greedy)")
    ev.add_argument("--temperature", type=float, default=None, help="0 = greedy (default train.eval_temperature)")
    ev.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    ev.set_defaults(func=_cmd_eval)

    plot = sub.add_parser("plot", help="write PNG training curves of one or more run directories")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", default=None, help="output directory (default: RUN_DIR/plots)")
    plot.set_defaults(func=_cmd_plot)

    rollout = sub.add_parser("rollout", help="run the entropy-adaptive tree rollout on held-out prompts and print "
                                             "the trees", description="One rollout with the config's settings "
                             "(rollout.*, tools.*, reward.*) of the first --n held-out prompts of its data.")
    _config_args(rollout)
    rollout.add_argument("--toy", action="store_true", help="decode with the scripted toy policy (a model that "
                         "keeps writing python calls) instead of model.path: shows the mechanics untrained")
    rollout.add_argument("--n", type=int, default=2, help="number of prompts")
    rollout.add_argument("--out", default=None, help="write the trees as JSONL here")
    rollout.add_argument("--show", type=int, default=1, help="print this many trees as text (0 = none)")
    rollout.add_argument("--max-chars", type=int, default=160, help="cut each printed segment to this many "
                                                                    "characters")
    rollout.set_defaults(func=_cmd_rollout)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on a checkpoint (completions, chat, "
                           "streaming, agent mode with --tools)", description="Serve CHECKPOINT on the engine: "
                           "/v1/models, /v1/completions, /v1/chat/completions, /health. Config as for `arpo eval`: "
                           "the checkpoint's saved config, else the embedded defaults, then the overrides.")
    serve.add_argument("checkpoint", help="a checkpoint directory (Hugging Face format + tokenizer)")
    _config_args(serve)
    serve.add_argument("--tools", default=None, metavar="python,search", help="agent mode: run these tools in the "
                       "loop (a reply stops at a closing tag, the sandboxed call runs, its result is appended)")
    from arpo.serve.settings import ChatSettings, add_arguments

    add_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    chat = sub.add_parser("chat", help="talk to a checkpoint in the terminal (streamed, multi-turn, tools)",
                          description="An interactive session with CHECKPOINT: /reset forgets the history, /exit "
                                      "leaves, Ctrl-C stops a reply. Config as for `arpo eval`.")
    chat.add_argument("checkpoint", help="a checkpoint directory (Hugging Face format + tokenizer)")
    _config_args(chat)
    chat.add_argument("--tools", default=None, metavar="python,search", help="let the model call these tools; "
                      "calls and results are shown as they run")
    add_arguments(chat, ChatSettings)
    chat.set_defaults(func=_cmd_chat)

    bench = sub.add_parser("bench", help="run throughput/memory benchmarks and print a comparison table")
    bench.add_argument("workload", nargs="?", help="benchmark to run (see --list)")
    bench.add_argument("--list", action="store_true", help="list the available benchmarks")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    bench.add_argument("--quick", action="store_true", help="smallest shapes only (smoke run)")
    bench.add_argument("--out", default=None, help="write the results as JSON to this path")
    bench.add_argument("--only", default=None, help="run only the workloads whose label contains this text")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
