"""Command line: argument parsing only; each command calls one stage function."""

from __future__ import annotations

import argparse
import sys

from pipeline.errors import PipelineError, Terminated, raise_on_sigterm

EXIT_USAGE, EXIT_DIVERGED, EXIT_IO = 2, 3, 4


def _add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="verify and split a dataset into cached uint8 tensors")
    p.add_argument("--dataset", default="fashion-mnist",
                   help="fashion-mnist (default), mnist, cifar10, svhn, celeba, or a path: a folder of images "
                        "(optionally one subfolder per class) or a .npy/.npz file of uint8 images")
    p.add_argument("--raw-dir", help="a named dataset's files: the four IDX files, plain or .gz, of (fashion-)mnist "
                   "(default: where Debian's dataset-fashion-mnist installs them), or torchvision's files of the others")
    p.add_argument("--val-size", type=int, default=5000, help="images held out of the training images (default 5000)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val (and test) split (default 0)")
    p.add_argument("--image-size", type=int, help="resize the shorter side and centre-crop to this square side, 8-64 "
                   "(data.image_size; default: the source's size)")
    p.add_argument("--channels", type=int, help="1 (grey) or 3 (RGB), converting as needed (data.channels; default: "
                   "the source's)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of the images that becomes the test set when the source has none (default 0.1)")
    p.add_argument("--download", action="store_true", help="download a named dataset with torchvision if no local "
                   "copy is found (needs internet)")
    p.add_argument("--force", action="store_true", help="redo even if a valid cache exists")
    p.add_argument("--no-classifier", action="store_true",
                   help="skip training the feature classifier used by evaluate (it is trained on first use then)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one VAE config (skips finished runs, resumes interrupted ones)")
    p.add_argument("--config", help="YAML file with the keys that differ from the defaults")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set objective.beta=4 (repeatable)")
    p.add_argument("--run-dir", help="where checkpoints go (default runs/<experiment>/<config hash>)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint (error if none)")
    g.add_argument("--restart", action="store_true", help="discard the run directory's checkpoint and start over")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="likelihood, collapse and sharpness diagnostics of a trained run")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="MLflow run id (its run directory's checkpoint is evaluated)")
    g.add_argument("--checkpoint", help="checkpoint file or run directory")
    p.add_argument("--k", type=int, help="IWAE importance samples (default 1000 on CUDA, 100 on CPU)")
    p.add_argument("--test-subset", type=int, help="evaluate on the first N test images only")
    p.add_argument("--train-subset", type=_train_subset, default=None, metavar="N|on|off",
                   help="training images to score under trainset/ (default: the run's eval.train_subset, as many "
                        "as the test images)")
    p.add_argument("--n-samples", type=int, default=None,
                   help="prior samples for sharpness and Fréchet distance (default 10000; 256 for a PixelCNN on CPU)")
    p.add_argument("--mi-batch", type=int, default=1000, help="batch size of the mutual-information estimate")
    p.add_argument("--device", default="auto")


def _train_subset(text: str) -> bool | int:
    if text in ("on", "true"):
        return True
    if text in ("off", "false"):
        return False
    if text.isdigit() and int(text) >= 2:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: give a number of images ≥ 2, 'on' (as many as the test images) or 'off'")


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="validate a study file and list the trials it will run (runs nothing)")
    p.add_argument("study", help="a study YAML, e.g. studies/beta.yaml")


def _add_study(sub) -> None:
    p = sub.add_parser("study", help="run or resume a study (any design): the same command continues a killed study")
    p.add_argument("study", help="a study YAML, e.g. studies/demo.yaml")
    p.add_argument("--storage", help="Optuna storage URL or journal file (default runs/<study>/optuna.journal)")
    p.add_argument("--max-trials", type=int, help="stop after this many trials (this worker)")
    p.add_argument("--no-wait", action="store_true",
                   help="exit when nothing is left to claim, instead of waiting for trials other workers hold")
    s = sub.add_parser("status", help="the trial table of a study: state, point, objectives, duration")
    s.add_argument("study")
    s.add_argument("--storage")
    w = sub.add_parser("workers", help="run N worker processes on one study (one per GPU when several are visible)")
    w.add_argument("study")
    w.add_argument("-n", "--workers", type=int, default=2)
    w.add_argument("--per-gpu", type=int, default=1, help="workers per GPU when several GPUs are visible")
    w.add_argument("--storage")
    d = sub.add_parser("dashboard", help="serve optuna-dashboard for a study on 127.0.0.1")
    d.add_argument("study")
    d.add_argument("--port", type=int, default=8080)
    d.add_argument("--storage")


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write reports/<study>/ (report.html, report.md, summary.csv, figures/) from MLflow and Optuna")
    p.add_argument("study", help="a study YAML, e.g. studies/demo.yaml")
    p.add_argument("--storage", help="Optuna storage URL or journal file (default runs/<study>/optuna.journal)")
    p.add_argument("--out", help="output directory (default reports/<study>)")
    p.add_argument("--interaction", nargs=2, metavar=("FACTOR_A", "FACTOR_B"),
                   help="the two factors of the interaction heatmap (default: the study's first two)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the report to the study's parent MLflow run")


def _add_services(sub) -> None:
    p = sub.add_parser("postgres", help="start (or --stop) the project's PostgreSQL cluster on 127.0.0.1 "
                                        "(databases optuna and mlflow; password in services/pgpass)")
    p.add_argument("--stop", action="store_true")
    p.add_argument("--port", type=int, help="default $VAE_PG_PORT or 5433")
    s = sub.add_parser("server", help="start (or --stop) an MLflow tracking server backed by that PostgreSQL")
    s.add_argument("--stop", action="store_true")
    s.add_argument("--port", type=int, help="default $VAE_MLFLOW_PORT or 5000")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="serve the MLflow UI on 127.0.0.1 against the project's tracking store")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--workers", type=int, default=2, help="server processes (default 2; one user needs no more)")
    p.add_argument("--print-links", action="store_true",
                   help="print each experiment's links into the UI (runs, a run's metrics) and exit, serving nothing")
    p.add_argument("--experiment", help="only this experiment's links (a study's experiment is named after it)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-pipeline", description="Staged, tracked, resumable VAE ablations.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_plan(sub)
    _add_study(sub)
    _add_report(sub)
    _add_services(sub)
    _add_ui(sub)
    return parser


def _cmd_prepare(args) -> int:
    from functools import partial

    from tqdm.auto import tqdm

    from pipeline.config import build_config
    from pipeline.data import DataOptions, load_splits, prepare

    # Validated as a run's data section would be: the same messages for a bad path, size or channel count.
    d = build_config({"data": {"dataset": args.dataset, "val_size": args.val_size, "split_seed": args.split_seed,
                               "image_size": args.image_size, "channels": args.channels,
                               "test_fraction": args.test_fraction}}).data
    options = DataOptions.of(d).conversions
    prepare(d.dataset, val_size=d.val_size, split_seed=d.split_seed, raw_dir=args.raw_dir, download=args.download,
            force=args.force, progress=partial(tqdm, disable=None), **options)  # no bars in a log file
    if not args.no_classifier:
        from pipeline.classifier import ensure_classifier
        from pipeline.runtime import resolve_device

        splits = load_splits(d.dataset, d.val_size, d.split_seed, **options)
        if not splits.has_labels:
            print("[prepare] no labels: the feature classifier (Fréchet distance, KID, precision/recall) is not trained; "
                  "evaluation reports those metrics as unavailable")
            return 0
        _, info = ensure_classifier(d, splits, resolve_device("auto"))
        print(f"[prepare] feature classifier ready (test accuracy {info['test_accuracy']:.2%})")
    return 0


def _cmd_train(args) -> int:
    import yaml

    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from pipeline.stages import train_stage

    mode = "resume" if args.resume else "restart" if args.restart else "auto"
    result = train_stage(cfg, args.run_dir, mode=mode, progress=False if args.no_progress else None)
    if result.status == "diverged":
        return EXIT_DIVERGED
    where = f"MLflow run {result.run_id}" if result.run_id else "tracking disabled"
    print(f"[train] {result.status}: {result.run_dir} ({where})")
    if result.run_id:
        from pipeline.tracking import experiment_links

        _print_links("train", experiment_links(cfg.tracking.experiment, result.run_id), "this run's metrics")
    return 0


def _print_links(command: str, links, run_label: str) -> None:
    """Where to look in the MLflow UI (tracking.UiLinks; None: nothing there yet)."""
    if links is None:
        return
    after = "" if links.served else "   (after `make ui`)"
    print(f"[{command}] MLflow runs: {links.runs}{after}")
    if links.run_metrics:
        print(f"[{command}] {run_label}: {links.run_metrics}")


def _cmd_evaluate(args) -> int:
    from pipeline.evaluate import evaluate_stage

    evaluate_stage(args.checkpoint, args.run, k=args.k, test_subset=args.test_subset, n_samples=args.n_samples,
                   train_subset=args.train_subset, mi_batch=args.mi_batch, device=args.device)
    return 0


def _cmd_plan(args) -> int:
    from pipeline.studyspec import expand_trials, load_study

    spec = load_study(args.study)
    print(f"study {spec.name!r} ({spec.sampler}): {spec.description.strip()}".rstrip(": "))
    print("  factors: " + "; ".join(f"{k} = {v if isinstance(v, list) else v.model_dump()}" for k, v in spec.space.items()))
    print(f"  seeds: {spec.seeds}   objectives: " + ", ".join(f"{o.direction} {o.metric}" for o in spec.objectives))
    if spec.sampler in ("grid", "ofat"):
        trials = expand_trials(spec)
        print(f"  {len(trials)} trials ({len(trials) // len(spec.seeds)} points × {len(spec.seeds)} seeds):")
        for t in trials[:50]:
            point = ", ".join(f"{k}={v}" for k, v in t.point.items())
            print(f"    #{t.index:<4} seed {t.seed}  {point}  [{t.config_hash}]")
        if len(trials) > 50:
            print(f"    … and {len(trials) - 50} more")
    else:
        print(f"  {spec.n_trials} trials drawn by {spec.sampler}, each the mean over {len(spec.seeds)} seed(s)"
              + (f", pruner {spec.pruner}" if spec.pruner != "none" else ""))
    return 0


def _cmd_study(args) -> int:
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    spec = load_study(args.study)
    progress = run_study(spec, _storage(args), max_trials=args.max_trials, wait=not args.no_wait)
    from pipeline.study import mlflow_links

    _print_links("study", mlflow_links(spec), "the best config's run, its metrics")
    print(f"[study] trial table: make status STUDY={args.study}; Optuna's view: make dashboard STUDY={args.study}")
    return 0 if len(progress.done) + len(progress.running) == progress.total or args.max_trials else 1


def _cmd_workers(args) -> int:
    from pipeline.study import launch_workers
    from pipeline.studyspec import load_study

    load_study(args.study)  # validate once, before any worker starts
    failed = launch_workers(args.study, args.workers, _storage(args), args.per_gpu)
    print(f"[workers] {args.workers - failed}/{args.workers} workers ended cleanly; make status STUDY={args.study}")
    return 1 if failed else 0


def _cmd_dashboard(args) -> int:
    from pipeline.errors import masked
    from pipeline.study import serve_dashboard, study_dir
    from pipeline.studyspec import load_study

    spec = load_study(args.study)
    storage = _storage(args)
    shown = masked(storage) if storage else str(study_dir(spec) / "optuna.journal")
    print(f"[dashboard] http://127.0.0.1:{args.port}  (storage: {shown}; Ctrl-C stops it)", flush=True)
    serve_dashboard(spec, storage, args.port)
    return 0


def _cmd_status(args) -> int:
    from pipeline.study import status_rows
    from pipeline.studyspec import load_study

    rows = status_rows(load_study(args.study), _storage(args))
    if not rows:
        print("no trials yet")
        return 0
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    return 0


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cmd_report(args) -> int:
    from pipeline.report import report_stage
    from pipeline.studyspec import load_study

    spec = load_study(args.study)
    path = report_stage(spec, _storage(args), args.out,
                        interaction=tuple(args.interaction) if args.interaction else None, log_to_mlflow=not args.no_mlflow)
    print(f"[report] open it: {path}")
    from pipeline.study import mlflow_links

    _print_links("report", mlflow_links(spec), "the best config's run, its metrics")
    return 0


def _storage(args) -> str | None:
    """--storage, else $VAE_STUDY_STORAGE: a URL with a password need not appear on a command line."""
    import os

    return args.storage or os.environ.get("VAE_STUDY_STORAGE") or None


def _cmd_postgres(args) -> int:
    from pipeline import services

    if args.stop:
        services.stop_postgres(args.port)
        return 0
    pg = services.start_postgres(args.port)
    print(f"[postgres] Optuna storage: --storage {pg.url('optuna')}   (make study STORAGE=…)")
    print(f"[postgres] clients read the password from PGPASSFILE={services.pgpass_path()} (set for you by the "
          "pipeline; export it for other tools)")
    return 0


def _cmd_server(args) -> int:
    from pipeline import services

    if args.stop:
        services.stop_server()
        return 0
    url = services.start_server(args.port, args.host)
    print(f"[server] export MLFLOW_TRACKING_URI={url}   (then make study/workers/ui use it)")
    return 0


def _cmd_ui(args) -> int:
    import os

    from pipeline import paths
    from pipeline.errors import masked
    from pipeline.tracking import ensure_store, pipeline_experiments, tracking_uri, ui_links

    ensure_store(tracking_uri())  # not mlflow ui's own in-place creation, which a kill can leave half done
    base = f"http://{_loopback_if_any(args.host)}:{args.port}"
    try:
        experiments = pipeline_experiments(name=args.experiment)
    except Exception as e:  # the links are a convenience: the UI is served all the same
        print(f"[ui] could not list the experiments: {masked(str(e).splitlines()[0] if str(e) else type(e).__name__)}")
        experiments = []
    for name, experiment_id, run_id, what in experiments:
        links = ui_links(base, experiment_id, run_id)
        print(f"[ui] experiment {name!r}: {links.runs}\n[ui]   {what}, its metrics: {links.run_metrics}")
    if args.print_links:
        if not experiments:
            print(f"[ui] no {'experiment ' + repr(args.experiment) if args.experiment else 'experiment'} with "
                  "runs of this pipeline in the store yet")
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(),
           "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    if tracking_uri().startswith("sqlite:"):
        cmd += ["--default-artifact-root", paths.mlflow_artifacts().as_uri()]
    # MLflow's job runner serves GenAI features this pipeline does not use, and its processes keep two
    # cores busy for ~20 s after start (bench/RESULTS.md, "Tracking server").
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    print(f"[ui] MLflow UI on {base}  (store: {masked(tracking_uri())}; Ctrl-C stops it)", flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached


def _loopback_if_any(host: str) -> str:
    """The address a browser on this machine uses for a server bound to `host`."""
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _os_error(e: OSError) -> str:
    import errno

    where = e.filename or "a file"
    if e.errno == errno.ENOSPC:
        return (f"no space left on the device holding {where}; free some space and rerun the same command "
                "(finished epochs and runs are kept; every write is atomic)")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {where}: {e.strerror}; make it writable, or point VAE_PIPELINE_HOME at a "
                "writable directory")
    return f"{where}: {e.strerror or e}"


def _out_of_memory(e: BaseException) -> bool:
    # torch: torch.OutOfMemoryError (CUDA; a RuntimeError), "DefaultCPUAllocator: can't allocate memory".
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_on_sigterm()
    try:
        commands = {"prepare": _cmd_prepare, "train": _cmd_train, "evaluate": _cmd_evaluate, "plan": _cmd_plan,
                    "study": _cmd_study, "status": _cmd_status, "workers": _cmd_workers,
                    "dashboard": _cmd_dashboard, "postgres": _cmd_postgres, "server": _cmd_server, "ui": _cmd_ui, "report": _cmd_report}
        return commands[args.command](args)
    except (PipelineError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the disk, not the input: say which file and what to do, not a traceback
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return EXIT_IO
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise  # a bug: its traceback is what a report needs
        print("error: out of memory; lower train.batch_size or eval.batch_size (or model size), or free memory "
              "used by other processes, then rerun the same command (finished epochs are kept)", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\n{how}; rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
