"""Data-parallel training over MPI ranks.

  mpirun -np 8 python -m hpcaccel.train                      # digits, built-in CNN
  mpirun -np 4 python -m hpcaccel.train --data /scratch/ds/index.json --model mlp
  mpirun -np 4 python -m hpcaccel.train --data diabetes --epochs 50   # regression (--task auto)
  srun --mpi=pmix python -m hpcaccel.train --config run.toml
  python -m hpcaccel.train --help

Exit codes: 0 success; 2 bad input (one line from rank 0, nothing in --out overwritten);
3 stopped by SIGUSR1/SIGTERM after writing a checkpoint (requeue and --resume auto);
1 any other failure, which ends every rank (MPI_Abort) instead of leaving them waiting.
"""
from __future__ import annotations

import sys
import time
import traceback

from .errors import REQUEUE_EXIT_CODE, Diverged, SetupFailed, UsageError


def setup(cfg, control, timeline):
    """Every set-up phase, agreed collectively: a failure on any rank fails all of them."""
    from . import advice, augment, data, env, tasks
    from .comm import make_reducer, reducer_options
    from .models import build_model
    from .optim import make_optimizer

    collectively = control.collectively
    world = collectively(env.detect, threads=cfg.threads, comm=control.comm)
    reducer = collectively(make_reducer, cfg.backend, comm=control.comm, timeline=timeline,
                           **reducer_options(cfg))
    shape = tuple(int(s) for s in cfg.synthetic_shape.split(","))
    train_ds, test_ds = collectively(
        data.resolve, cfg.data, cfg.test_data, samples=cfg.synthetic_samples, shape=shape,
        classes=cfg.synthetic_classes, seed=cfg.seed, pack=world.local_rank == 0,
        wait=control.agree, inspect=world.is_main, share=control.broadcast)
    # the loss, metrics and output shape; a task that does not fit y stops before the scan
    task = collectively(tasks.resolve, cfg.task, train_ds.target, f"--data {cfg.data}",
                        loss=cfg.loss, label_smoothing=cfg.label_smoothing)
    collectively(augment.check_targets, cfg.augment, train_ds.sample_shape, train_ds.target_shape)
    scanned = {}

    def check_data():
        if cfg.check_data:  # each rank scans its own share; agreed collectively below
            scanned.update(data.scan(train_ds, world.rank, world.size, "--data"))
            if test_ds is not None:
                data.scan(test_ds, world.rank, world.size, "--test-data")
        data.require_samples(train_ds, cfg.batch_size, world.size)
    collectively(check_data)
    if cfg.check_data:  # warnings where training would go on with silently bad results
        per_rank = control.gather(scanned)
        for line in advice.data_warnings(advice.merge_stats(per_rank), train_ds.classes, "--data",
                                         train_ds.files[0]) if world.is_main else []:
            print(f"hpcaccel: warning: {line}", file=sys.stderr, flush=True)

    import torch
    from . import device as devices
    from . import finetune

    dev = collectively(devices.resolve, cfg.device, world.local_rank, world.local_size)
    collectively(devices.check_precision, cfg.precision, dev)
    torch.manual_seed(cfg.seed)
    model = collectively(build_model, cfg.model, train_ds.sample_shape, task.output_shape,
                         dropout=cfg.dropout)
    if cfg.init_from:
        loaded, fresh = collectively(finetune.load_matching, model, cfg.init_from)
        if world.is_main:
            print(f"hpcaccel: --init-from {cfg.init_from}: loaded {len(loaded)} tensors"
                  + (f", kept fresh: {', '.join(fresh[:6])}" if fresh else ""), flush=True)
    if cfg.freeze:
        frozen = collectively(finetune.freeze, model, finetune.parse_prefixes(cfg.freeze))
        if world.is_main:
            print(f"hpcaccel: --freeze: {len(frozen)} parameter tensors frozen", flush=True)
    model.to(dev)
    if ":" in cfg.task:  # a factory's loss and metrics meet a batch before training does
        x, y = collectively(data.first_batch, train_ds, cfg.batch_size)
        collectively(tasks.check_on_batch, task, model, x, y, cfg.task)
    optimizer = make_optimizer(cfg, model)
    reducer.broadcast_parameters(model)  # all ranks start from rank 0's initialisation
    reducer.attach(model, optimizer)
    return world, reducer, model, optimizer, train_ds, test_ds, task


def restore(cfg, control, world, model, optimizer, reducer, path, required) -> dict | None:
    """Load checkpoint `path` (rank 0 chose it: rundir.claim) on every rank, checked against
    `required` first, and restore the model, optimizer state, reducer state (PowerSGD) and
    this rank's RNG; None for a fresh start."""
    import torch
    from . import buffers, checkpoint

    if path is None:
        # Per-rank RNG streams (dropout, augmentation); initialisation came from rank 0.
        torch.manual_seed(cfg.seed * 1_000_003 + 1 + world.rank)
        return None
    state = control.collectively(checkpoint.load, path, required)
    if state.get("partial"):  # written by another world size: the epoch's sums carry over
        from .elastic import redistribute_partial
        state["partial"] = redistribute_partial(state["partial"], world.size)
    model.load_state_dict(state["model"])  # buffers: the ones the ranks agreed on
    buffers.restore_own(model, state.get("buffers"), world.rank, world.size)  # mid-epoch
    checkpoint.load_optimizer(optimizer, state["optimizer"])
    checkpoint.restore_rank_state(state, reducer, world.rank, world.size,
                                  reseed=cfg.seed * 1_000_003 + 1 + world.rank)
    reducer.optimizer_state_loaded()  # sharded: this rank keeps its part
    state["path"] = path
    return state


def run(argv, control) -> dict:
    from . import advice, checkpoint, config, rundir, runrecord
    from .data import RankReader
    from .env import describe_hosts
    from .metrics import NullRunLog, RunLog, bar_wanted, progress_bar
    from .comm.backend_choice import backend_phrase
    from .models import auto_choice
    from .signals import StopRequest
    from .timeline import NullTimeline, Timeline
    from .trainer import LoopHooks, Trainer
    from .watchdog import start_watchdog
    from .wording import mib, plural

    t_start = time.perf_counter()
    stop = StopRequest()  # from the start: a signal during set-up is honoured at step 1
    cfg = control.collectively(config.parse_args, argv, quiet=not control.is_main)
    # every output path, before set-up and the claim write anything (rank 0 writes them)
    control.collectively(lambda: control.is_main and rundir.check_paths(
        cfg.out, {"--timeline": cfg.timeline}))
    # one timeline for the reader, the reducer and the loop; its file is created in start()
    timeline = Timeline(cfg.timeline, control) if cfg.timeline else NullTimeline()
    world, reducer, model, optimizer, train_ds, test_ds, task = setup(cfg, control, timeline)
    given = config.given_values(argv, quiet=True)[0]  # what the user set (flags, --config)
    if world.is_main:
        for line in (advice.flag_warnings(given, reducer.name)
                     + advice.task_warnings(task.name, train_ds.target, f"--data {cfg.data}")):
            print(f"hpcaccel: warning: {line}", file=sys.stderr, flush=True)
    required = checkpoint.requirements(model, optimizer, reducer.state_dict(), world.size, task)
    claim = rundir.claim_collectively(cfg, control, model, train_ds, world.size, required,
                                      info=print if world.is_main else lambda line: None,
                                      task=task.name)
    if claim.complete:  # outputs stay untouched
        if world.is_main:
            print(f"hpcaccel: run {claim.run_id} in {cfg.out} is already complete ({cfg.epochs} "
                  f"epochs or more); nothing to do (a larger --epochs continues it)", flush=True)
        reducer.close()
        return {"already_complete": True}
    plan = claim.plan  # another world size than the checkpoint's: keep its global batch
    if plan is not None:
        cfg.batch_size, cfg.accum_steps = plan.batch_size, plan.accum_steps
    resumed = restore(cfg, control, world, model, optimizer, reducer, claim.checkpoint, required)
    staging = None
    if cfg.stage_dir:  # the files this host reads from here on, copied to node-local storage
        from .data.staging import stage_run
        train_ds, test_ds, staging = stage_run(cfg, control, world, train_ds, test_ds,
                                               resumed["epoch"] if resumed else 0)
    reader = RankReader(train_ds, world.rank, world.size, cfg.batch_size, cfg.shuffle, cfg.seed,
                        timeline=timeline)
    if resumed is not None and plan is not None and plan.resized:
        reader.continue_layout(plan.epoch, plan.from_world_size)  # no sample skipped or twice
    log = RunLog(cfg.out, append=resumed is not None) if world.is_main else NullRunLog()
    if resumed is not None:
        log.info(f"hpcaccel: resuming from {resumed['path']} (epoch {resumed['epoch'] + 1}, "
                 f"step {resumed['global_step']})"
                 + (f"; {plan.describe()}" if plan is not None and plan.resized else ""))
    elif plan is not None:
        log.info(f"hpcaccel: keeping run {claim.run_id}'s global batch {plan.global_batch}: "
                 f"{plural(world.size, 'rank')} x --batch-size {plan.batch_size} with "
                 f"--accum-steps {plan.accum_steps}")
    device = next(model.parameters()).device
    log.info(f"hpcaccel: {plural(world.size, 'rank')} on {world.nodes} node(s) "
             f"({describe_hosts(world.hosts)}), {world.threads} thread(s) "
             f"per rank, device {device}, precision {cfg.precision}, "
             f"backend {backend_phrase(reducer)}, compression {compression_phrase(cfg)}, "
             f"{world.mpi_library}; data {train_ds.samples} "
             f"samples in {len(train_ds.files)} file(s), {reader.steps} steps/epoch; "
             f"task {task_phrase(task)}; model " + (
                 f"{auto_choice(train_ds.sample_shape, task.output_shape)} (auto)"
                 if cfg.model == "auto" else cfg.model)
             + f"; optimizer {optimizer_phrase(cfg, given)}")
    if staging is not None:
        log.info(f"hpcaccel: --stage-dir {cfg.stage_dir}: each host reads at most "
                 f"{staging['train_files_per_host_max']} of {len(train_ds.files)} training file(s)"
                 + (f" and {staging['test_files_per_host_max']} of {len(test_ds.files)} test "
                    f"file(s)" if test_ds is not None else "")
                 + f", staged there in {staging['seconds_max']:.1f} s "
                 f"({mib(staging['bytes_copied_per_host_max'])} copied at most per host)")
    watchdog = start_watchdog(cfg.stall_timeout, cfg.out, world.rank, world.size, control.abort)
    control.collectively(timeline.start)
    hooks = LoopHooks(log=log, progress=progress_bar(world.is_main and bar_wanted(cfg.progress)),
                      stop=stop, watchdog=watchdog, timeline=timeline,
                      **({"mark": runrecord.ProgressMark(cfg.out, claim.run_id, world.size)}
                         if world.is_main else {}))
    trainer = Trainer(cfg, control, reducer, model, optimizer, reader, test_ds, hooks, task)
    try:
        result = trainer.fit(resumed)
    finally:
        watchdog.stop()
        stop.ignore_further()
    timeline.close()  # collective: every rank leaves fit() at the same step
    if "stopped_by" in result:
        log.info(f"hpcaccel: stopped by {result['stopped_by']} after step {result['steps']}; "
                 f"checkpoint {result['checkpoint']}; continue with --resume auto")
        log.close()
        reducer.close()
        return result
    summary = {"world_size": world.size, "resumed_from": resumed and resumed["path"],
               "nodes": world.nodes, "threads_per_rank": world.threads, "device": str(device),
               **exchange(reducer, cfg, control), "mpi_library": world.mpi_library, "epochs": cfg.epochs,
               "task": task.name,
               # the bucket size the mpi reducer used (--bucket-mb auto's choice included)
               **({"bucket_mib": reducer.bucket_bytes / 2**20}
                  if getattr(reducer, "bucket_bytes", None) else {}),
               **({"staging": staging} if staging is not None else {}), **result,
               # continuations of this run (requeues, elastic relaunches) and the steps they
               # took again: those their previous start took past its last checkpoint
               "restarts": (claim.restarts or {}).get("restarts", 0),
               "steps_lost": (claim.restarts or {}).get("steps_lost", 0),
               **({"last_restart": claim.restarts["last_restart"]} if claim.restarts else {}),
               **({"resized_from_world_size": plan.from_world_size}
                  if plan is not None and plan.resized else {}),
               "wall_seconds": time.perf_counter() - t_start, "config": cfg.to_dict()}
    trainer.buffers.agree()  # (agreed at the last epoch's end already: nothing to send)
    log.model(model.state_dict())
    log.summary(summary)
    log.info("done: " + (done_phrase(task, summary) if test_ds is not None else
                         "no test set (--test-data)")
             + f", {summary['samples_per_second']:.0f} samples/s, outputs in {cfg.out}")
    log.close()
    reducer.close()
    return summary


def exchange(reducer, cfg, control) -> dict:
    """summary.json's record of how gradients were exchanged, as it ran: the backend, the
    allreduce algorithm (the mpi reducer's, --allreduce auto resolved; Horovod's own) and
    --compression, and --shard with the optimizer-state bytes each rank held (the most;
    collective)."""
    algorithm = getattr(reducer, "algorithm", None)
    held = {}
    if reducer.sharded is not None:
        most = control.allreduce([reducer.sharded.state_bytes()], "max")[0]
        held = {"optimizer_state_bytes_per_rank_max": int(most)}
    return {"backend": reducer.name, "allreduce": getattr(algorithm, "name", reducer.name),
            "compression": cfg.compression, "shard": cfg.shard, **held}


def task_phrase(task) -> str:
    """The start-up line's task, and why where --task auto chose it."""
    return task.describe() + (f", chosen by --task auto from y's {task.target.kind}"
                              if task.chosen_by_auto else "")


def done_phrase(task, summary: dict) -> str:
    """The last line's test metrics: the task's headline ones, e.g. `test accuracy 0.9806`."""
    from .tasks import BUILTIN

    parts = []
    for name, _ in task.headline:
        value = summary.get(f"test_{name}")
        if isinstance(value, list):  # per output: for the files only
            continue
        words = name.replace("_", " ") if task.name in BUILTIN else name  # yours as you named it
        parts.append(f"test {words} " + ("n/a" if value is None else f"{value:.4f}"))
    return ", ".join(parts) or "test loss " + f"{summary['test_loss']:.4f}"


def optimizer_phrase(cfg, given: dict) -> str:
    """The start-up line's optimizer and peak lr, and whose lr it is where --lr was not
    given (each optimizer has its own default: config.DEFAULT_LR)."""
    phrase = f"{cfg.optimizer}, lr {cfg.lr:g}"
    if "lr" not in given:
        phrase += f" ({cfg.optimizer}'s default; --lr sets another)"
    if cfg.lr_ref_batch:
        phrase += f" x global batch / {cfg.lr_ref_batch}"
    return phrase


def compression_phrase(cfg) -> str:
    """The start-up line's --compression."""
    if cfg.compression != "powersgd":
        return cfg.compression
    return (f"powersgd (rank {cfg.powersgd_rank}"
            + (f", exact for the first {cfg.powersgd_start_step} steps)"
               if cfg.powersgd_start_step else ")"))


def format_failure(rank: int, e: BaseException) -> str:
    """A failing rank's report: one line naming the rank and error, then the traceback.
    (The three-argument format_exception: the one-argument form needs Python 3.10.)"""
    return (f"hpcaccel: rank {rank} failed: {type(e).__name__}: {e}\n"
            + "".join(traceback.format_exception(type(e), e, e.__traceback__)))


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    from . import departure
    from .control import ControlPlane

    control = ControlPlane()  # MPI.COMM_WORLD: the whole job
    rank = control.rank
    # Leaving is an event: however this rank ends, the others' waits learn it (a rank
    # still waiting in a collective this one never entered fails, naming it)
    departure.install(departure.Departures(control.comm))
    try:
        return _main(argv, control, rank)
    finally:
        departure.announce(2)


def _main(argv, control, rank) -> int:
    from . import departure

    try:
        result = run(argv, control)
        return REQUEUE_EXIT_CODE if "stopped_by" in result else 0
    except SystemExit as e:  # --help: printed by rank 0 only (see config)
        return int(e.code or 0)
    except UsageError as e:  # agreed by all ranks during set-up
        if rank == 0:
            print(f"hpcaccel: error: {e}", file=sys.stderr, flush=True)
        return UsageError.exit_code
    except SetupFailed as e:
        if rank == 0:
            print(f"hpcaccel: set-up failed: {e}", file=sys.stderr, flush=True)
        return 1
    except Diverged as e:  # decided by all ranks together: a clean, collective stop
        if rank == 0:
            print(f"hpcaccel: error: {e}", file=sys.stderr, flush=True)
        return Diverged.exit_code
    except BaseException as e:  # noqa: BLE001 - one rank failing must end every rank
        sys.stderr.write(format_failure(rank, e))
        sys.stderr.flush()
        from .runlock import release_held
        release_held()  # MPI_Abort skips exit handlers: OUT's lock would stay behind
        departure.announce(3)  # peers fail naming this rank, should the abort not end them
        control.abort(1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
