"""``livetrain`` command line: parse config, build, run, close in ``finally``.

    livetrain demo [--duration S] [--wandb MODE] [key=value ...]
    livetrain run --config my.yaml [--duration S] [--wandb MODE] [key=value ...]
    livetrain config [--config my.yaml] [key=value ...]   # resolved config
    livetrain config --help-fields                        # every field, documented
    livetrain status [--address A] [--namespace NS] [--json]   # a running livetrain's figures
    livetrain stop [--address A] [--namespace NS]              # stop it cleanly (not `ray job stop`)

Precedence: defaults < the YAML file < flags (--duration, --wandb,
--state-dir, --no-live) < key=value overrides. The last stdout line of
``demo`` and ``run`` is one JSON object: the run's summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path

import yaml

from livetrain.config import Config, ConfigError, field_docs, load_config, shipped_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livetrain", description="Continuous training for PyTorch on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("demo", "the whole loop on a synthetic drifting stream, locally"),
        ("run", "the whole loop on your shards (source.kind=directory)"),
    ):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", type=Path, help="YAML config" + (" (default: the shipped demo.yaml)" if name == "demo" else ""), required=name == "run")
        s.add_argument("--duration", type=float, help="stop after S seconds (default: until Ctrl-C)")
        s.add_argument("--wandb", choices=["auto", "online", "offline", "disabled"], help="W&B mode (tracking.wandb)")
        s.add_argument("--state-dir", help="state directory (state_dir)")
        s.add_argument("--no-live", action="store_true", help="no live view")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=0.01")
    h = sub.add_parser("history", help="every gate decision and drift alarm of a state directory")
    h.add_argument("--state-dir", required=True, type=Path)
    h.add_argument("--json", action="store_true", help="one JSON object per line")
    r = sub.add_parser("rollback", help="serve an earlier version again (running livetrain)")
    r.add_argument("version", nargs="?", type=int, help="version to serve (default: the previous one)")
    _where(r)
    r.add_argument("--reason", default="requested by hand")
    st = sub.add_parser("status", help="a running livetrain's figures (also one run as a Ray job)")
    _where(st)
    st.add_argument("--json", action="store_true", help="one JSON object")
    sp = sub.add_parser("stop", help="stop a running livetrain cleanly, a Ray job too: final checkpoint, summary, exit 0 "
                        "(`ray job stop` kills it RAY_JOB_STOP_WAIT_TIME_S seconds, 3 by default, after SIGTERM)")
    _where(sp)
    sp.add_argument("--timeout", type=float, default=300.0, help="seconds to wait until it has stopped")
    c = sub.add_parser("config", help="print the resolved config, or document every field")
    c.add_argument("--config", type=Path)
    c.add_argument("--help-fields", action="store_true", help="list every config field with its default and meaning")
    c.add_argument("--markdown", action="store_true", help="with --help-fields: as the README's markdown tables")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    q = sub.add_parser(
        "quarantine",
        help="list what was set aside and why; re-ingest it after fixing the cause",
        description=(
            "Lists every quarantine entry: shard, rows, reasons. --reingest re-reads an entry after you "
            "fixed the cause. A shard rejected whole: replace <landing>/NAME with the fixed file (or, if it "
            "is gone, fix the copy in <state_dir>/quarantine/whole/NAME); it is read again with a new arrival "
            "number. Bad rows of a shard: fix (or delete) the rows in <state_dir>/quarantine/<stem>.bad.parquet; "
            "they land as a new shard <stem>.reingest-<hash>.parquet and are validated again. Re-ingested "
            "entries move to quarantine/reingested/. A running `livetrain run` picks them up; otherwise the next one does."
        ),
    )
    q.add_argument("--config", type=Path)
    q.add_argument("--state-dir", help="state directory (state_dir)")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--reingest", metavar="NAME", help="re-ingest one entry (shard name)")
    g.add_argument("--all", action="store_true", help="re-ingest every entry")
    q.add_argument("overrides", nargs="*", metavar="key=value")
    return p


def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default="auto",
                   help="Ray address of the running livetrain: the head's HOST:PORT (default: auto, on a cluster node)")
    p.add_argument("--namespace", default="livetrain", help="ray.namespace of that livetrain")


def _fields_markdown() -> str:
    out, section = [], None
    for key, default, doc in field_docs():
        s = key.split(".")[0] if "." in key else "(top level)"
        if s != section:
            section = s
            out += ["", f"**{section}**", "", "| key | default | meaning |", "|---|---|---|"]
        out.append(f"| `{key}` | `{default}` | {doc.replace('|', '/')} |")
    return "\n".join(out)


def _resolve(args: argparse.Namespace) -> Config:
    flags: dict[str, object] = {}  # values as typed: a state dir named 2024 or "x #1" is no YAML
    if getattr(args, "duration", None) is not None:
        flags["duration_s"] = args.duration
    if getattr(args, "wandb", None):
        flags["tracking.wandb"] = args.wandb
    if getattr(args, "state_dir", None):
        flags["state_dir"] = args.state_dir
    if getattr(args, "no_live", False):
        flags["live_view"] = False
    path = args.config
    if path is None and args.command == "demo":
        path = shipped_config("demo")
    cfg = load_config(path, list(args.overrides), flags)
    if args.command == "demo" and not getattr(args, "state_dir", None) and not any(o.startswith("state_dir=") for o in args.overrides):
        cfg.state_dir = tempfile.mkdtemp(prefix="livetrain-demo-")
    return cfg


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Like ``parse_args``, but ``key=value`` overrides may stand anywhere among
    the flags (argparse takes one run of positionals; ``parse_intermixed_args``
    does not work with subcommands)."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and (stray or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:  # `livetrain config | head`: the reader is gone, as with any CLI say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at the interpreter's last flush
        return 1


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    if args.command == "history":
        return _history(args.state_dir, args.json)
    if args.command in ("rollback", "status", "stop"):
        return _remote(args)
    if args.command == "config" and args.help_fields:
        print(_fields_markdown() if args.markdown else "\n".join(f"{k} = {d}\n    {doc}" for k, d, doc in field_docs()))
        return 0
    try:
        cfg = _resolve(args)
    except (ConfigError, OSError) as e:
        print(f"livetrain: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "quarantine":
        from livetrain.actors.quarantine_cli import quarantine_command

        return quarantine_command(cfg, args.reingest, args.all)
    if args.command == "config":
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    return _run(cfg)


def _run(cfg: Config) -> int:
    from livetrain.pipeline import Pipeline

    print(f"livetrain: state dir {Path(cfg.state_dir).resolve()}", file=sys.stderr)
    pipeline = Pipeline(cfg)

    def interrupt(signum: int, frame: object) -> None:
        # Ctrl-C, `kill`: once the loop runs, it stops cleanly at its next tick (decisions
        # logged, final checkpoint, summary); while starting, or a second time, at once.
        # `ray job stop` sends SIGTERM too, but SIGKILLs RAY_JOB_STOP_WAIT_TIME_S (3) s
        # later, mid-stop: `livetrain stop` is a job's clean stop (README)
        if pipeline.looping and pipeline.interrupted is None:
            pipeline.interrupted = signal.Signals(signum).name
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    failure = None
    try:
        pipeline.start()
        print(f"livetrain: serving at {pipeline.url}", file=sys.stderr)
        pipeline.run(cfg.duration_s)
    except KeyboardInterrupt:
        print("livetrain: stopping", file=sys.stderr)
    except ConfigError as e:
        if pipeline.stop_reason is None:  # else `livetrain stop` ended its wait for a first shard
            print(f"livetrain: config error: {e}", file=sys.stderr)
            return 2
    except Exception as e:  # training or a thread failed: still stop cleanly and say what was done
        failure = _failure_text(e)
        print(f"livetrain: error: {failure}", file=sys.stderr)
    finally:
        pipeline.stop()
    if failure is not None:
        pipeline.final["error"] = " ".join(failure.split())[:500]
    elif pipeline.stop_reason is not None:
        print(f"livetrain: stopped ({pipeline.stop_reason})", file=sys.stderr)
    print(json.dumps(pipeline.final))
    return 1 if failure is not None or "train_error" in pipeline.final else 0


def _failure_text(e: BaseException) -> str:
    """``e`` and the error it was raised from, if any (the trainer's own), in words."""
    text = str(e) or type(e).__name__
    if e.__cause__ is not None:
        text += f": {type(e.__cause__).__name__}: {e.__cause__}"
    return text


def _history(state_dir: Path, as_json: bool) -> int:
    from livetrain.history import read_history

    if not Path(state_dir).is_dir():
        print(f"livetrain: no state directory at {state_dir}", file=sys.stderr)
        return 1
    events = read_history(state_dir)
    if not events:
        print(f"livetrain: no decisions in {state_dir}", file=sys.stderr)
        return 1
    for e in events:
        if as_json:
            print(json.dumps(e))
        elif e["kind"] == "alarm":
            print(f"{e['at_iso']}  alarm     {e['detector']:<12} seq {e['seq']:<6} features {e['features']}")
        else:
            print(f"{e['at_iso']}  {e['action']:<9} v{e['version']:<5} {e['reason']}")
    return 0


def _remote(args: argparse.Namespace) -> int:
    """rollback, status, stop: connect to the running livetrain's Ray, act, disconnect."""
    from livetrain.control import NotRunning, connected

    try:
        with connected(args.address, args.namespace):
            return {"rollback": _rollback, "status": _status, "stop": _stop}[args.command](args)
    except NotRunning as e:
        print(f"livetrain: {e}", file=sys.stderr)
        return 1


def _rollback(args: argparse.Namespace) -> int:
    import ray

    from livetrain.training.registry_actor import REGISTRY_NAME

    try:
        registry = ray.get_actor(REGISTRY_NAME, namespace=args.namespace)
        d = ray.get(registry.rollback.remote(args.version, args.reason))
    except (ValueError, ray.exceptions.RayError) as e:
        cause = getattr(e, "cause", None)  # the registry's own error, without the remote stack around it
        print(f"livetrain: rollback failed: {cause if isinstance(cause, ValueError) else e}", file=sys.stderr)
        return 1
    print(f"livetrain: now serving v{d.version} ({d.reason})")
    return 0


def _status(args: argparse.Namespace) -> int:
    from livetrain.control import read_status

    report = read_status(args.namespace)
    if args.json:
        print(json.dumps(report))
        return 0
    from rich.console import Console

    from livetrain.live_view import render

    job = f", Ray job {report['job_id']}" if report.get("job_id") else ""
    print(f"livetrain {report['state']} in namespace {report['namespace']!r}{job}; state dir {report['state_dir']}")
    Console().print(render(report, f"livetrain — {report.get('endpoint') or 'starting'}"))
    return 0


def _stop(args: argparse.Namespace) -> int:
    from livetrain.control import request_stop

    print(f"livetrain: stop requested in namespace {args.namespace!r}; waiting for the final checkpoint", file=sys.stderr)
    if not request_stop(args.namespace, "livetrain stop", args.timeout):
        print(f"livetrain: still running after {args.timeout:.0f} s (it stops after its current step)", file=sys.stderr)
        return 1
    print("livetrain: stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
