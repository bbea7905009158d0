"""hpcaccel's own calls for a training script of your own, beyond Horovod's API:

  RankData  this rank's part of an HDF5 dataset, read by hpcaccel's reader (shard-affine
            shuffling, the same number of steps on every rank, read-ahead, resume at a
            step), optionally copied to node-local storage first
  Job       checkpoints and resume, a clean stop on Slurm's signal agreed by every rank,
            and the stall watchdog with its hang report

    import hpcaccel.torch as hvd

    hvd.init()
    data = hvd.RankData("digits", batch_size=32, epochs=5)    # or an .h5 file / index.json
    model = Net(data.sample_shape, data.classes)
    optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                         named_parameters=model.named_parameters())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    job = hvd.Job("runs/mine", model, optimizer, data=data)
    start = job.resume()                    # this run's newest checkpoint, if it has one
    for epoch in range(start.epoch, data.epochs):
        for x, y in data.epoch(epoch):      # a resumed epoch starts at the saved step
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if job.should_stop():           # SIGUSR1/SIGTERM on any rank: all stop here
                job.checkpoint_and_exit()   # exit code 3: the Slurm templates requeue
        job.save()
    job.close()

These are the parts `python -m hpcaccel.train` runs on (data/reader.py, data/staging.py,
checkpoint.py, rundir.py, signals.py, watchdog.py, hang_report.py), on the runtime that
hvd.init() made: its control plane carries every decision, on a communicator of its own.
docs/scripts.md, "hpcaccel's own calls from a script", is the guide.

Cross-rank invariants: every call marked collective is made by every rank, in the same
order; should_stop() once per step on every rank, so the ranks vote at the same steps.
"""
from __future__ import annotations

import contextlib
import sys
import types
from dataclasses import dataclass, field

from ..errors import REQUEUE_EXIT_CODE, UsageError
from ..signals import STOP_SIGNALS, StopRequest
from .basics import runtime


def _or_exit(control, fn, *args, **kwargs):
    """fn(...); a UsageError (bad input, agreed by every rank) ends every rank as
    hpcaccel.train ends: one line from rank 0, exit code 2, no traceback."""
    try:
        return fn(*args, **kwargs)
    except UsageError as e:
        if control.is_main:
            print(f"hpcaccel: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(UsageError.exit_code) from None


# The refusals rundir.py and checkpoint.py share with hpcaccel.train name its flags; a Job
# takes these arguments instead (longest first: "--resume auto" before "--resume ").
_SCRIPT_WORDS = (("--overwrite true", "overwrite=True"), ("--overwrite:", "overwrite=True:"),
                 ("--resume auto", 'resume="auto"'),
                 ("--resume none", 'resume="none"'), ("--resume ", "resume="),
                 ("a new --out", "a new out"), ("--out ", "out "))


def _script_words(text: str) -> str:
    for flag, argument in _SCRIPT_WORDS:
        text = text.replace(flag, argument)
    return text


def _in_script_words(fn, *args, **kwargs):
    """fn(...), with a refusal's remedies named as a Job's arguments."""
    try:
        return fn(*args, **kwargs)
    except UsageError as e:
        raise UsageError(_script_words(str(e))) from None


def _say(control, line: str) -> None:
    if control.is_main:
        print(line, flush=True)


class RankData:
    """This rank's part of an HDF5 dataset (docs/data.md): `steps` batches per epoch on
    every rank, each rank reading only its own ranges of the files."""

    def __init__(self, source: str, batch_size: int, *, epochs: int | None = None,
                 shuffle: bool = True, seed: int = 0, test: str | None = None,
                 stage_dir: str | None = None, prefetch: int = 4):
        """Collective: open the dataset's metadata (rank 0 reads it, every rank gets it).

        source: an HDF5 file or the index.json of a shard set (`python -m hpcaccel.data
          pack` writes both), or a built-in source: "digits" (scikit-learn's 8x8 digits;
          its test split becomes the test set) or "synthetic" (hpcaccel.train's defaults).
        batch_size: samples per rank and step.
        epochs: how many epochs the run trains; a Job takes it from here, and stage_dir
          needs it (the files staged are those this host reads in the epochs left).
        shuffle, seed: a new order each epoch, shuffled within a window of the shards
          (shard-affine), the same for a given seed, world size and batch size.
        test: an evaluation set (HDF5 file or index.json) for test_batches().
        stage_dir: node-local storage (local SSD, /tmp, $SLURM_TMPDIR): in Job.resume() (or
          at the first epoch() without a Job), one rank per host copies there the files
          its host's ranks read.
        prefetch: batches a background thread reads ahead.

        Bad input (a missing or malformed file, fewer samples than ranks x batch_size)
        ends every rank with one line from rank 0 and exit code 2."""
        from .. import data
        from ..config import TrainConfig

        rt = runtime()
        self._control = control = rt.control
        self._rank, self._size, self._local_rank = rt.rank, rt.size, rt.local_rank
        defaults = TrainConfig()
        shape = tuple(int(s) for s in defaults.synthetic_shape.split(","))

        def check():
            if batch_size < 1:
                raise UsageError(f"RankData: batch_size must be at least 1, got {batch_size}")
            if stage_dir and epochs is None:
                raise UsageError("RankData: stage_dir needs epochs= (the files staged are "
                                 "those this host's ranks read in the epochs of the run)")
        _or_exit(control, control.collectively, check)
        self.dataset, self.test_dataset = _or_exit(
            control, data.resolve, source, test, samples=defaults.synthetic_samples,
            shape=shape, classes=defaults.synthetic_classes, seed=seed,
            pack=rt.local_rank == 0, wait=control.agree, inspect=control.is_main,
            share=control.broadcast, flags=("RankData source", "RankData test"))
        _or_exit(control, control.collectively, data.require_samples, self.dataset,
                 batch_size, self._size, "RankData source", "batch_size")
        self.batch_size, self.epochs, self.shuffle, self.seed = batch_size, epochs, shuffle, seed
        self.stage_dir, self.prefetch = stage_dir, prefetch
        self.staging: dict | None = None  # stage_run's summary once staged
        self._reader = self._make_reader()
        # (epoch, batches of it handed out), (epoch + 1, 0) once a loop over it ended: where
        # a save resumes
        self.position = (0, 0)
        self._resume_at: tuple[int, int] | None = None

    def _make_reader(self):
        from ..data import RankReader

        return RankReader(self.dataset, self._rank, self._size, self.batch_size, self.shuffle,
                          self.seed, prefetch=self.prefetch)

    @property
    def steps(self) -> int:
        """Batches per epoch, the same on every rank (the samples beyond ranks x steps x
        batch_size are left out of that epoch; another order leaves out others)."""
        return self._reader.steps

    @property
    def samples(self) -> int:
        return self.dataset.samples

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.dataset.sample_shape)

    @property
    def classes(self) -> int:
        """Classes of integer labels (0 for float targets)."""
        return self.dataset.classes

    @property
    def target(self):
        """What y holds per sample (data.Target: shape, dtype, classes; describe())."""
        return self.dataset.target

    def epoch(self, epoch: int):
        """This rank's batches of `epoch` (0-based) as (x, y) tensors: x float32 of
        (batch_size, *sample_shape), y as the files hold it (int64 class labels, or float
        targets: `target` says). After Job.resume() the resumed
        epoch starts at the saved step (a checkpoint taken at the epoch's last step yields
        nothing more, so the code after your loop over it still runs). Collective when it
        first stages (stage_dir)."""
        first = 0
        if self._resume_at is not None and self._resume_at[0] == epoch:
            first = self._resume_at[1]
        self._resume_at = None
        self._stage(epoch)
        self.position = (epoch, first)
        for done, batch in enumerate(self._reader.epoch(epoch, first), start=first + 1):
            self.position = (epoch, done)  # this batch counts as trained once it is saved
            yield batch
        self.position = (epoch + 1, 0)  # the loop over the epoch has ended

    def resume_at(self, epoch: int, step: int) -> None:
        """Local. The next epoch(epoch) starts at batch `step` (Job.resume() calls it)."""
        self._resume_at = (epoch, step)
        self.position = (epoch, step)

    def test_batches(self, batch_size: int = 256):
        """This rank's contiguous part of the test set as (x, y) batches: every sample
        exactly once over all ranks; sum your counts with hvd.allreduce(..., op=hvd.Sum).
        Local (no collective). ValueError when there is no test set."""
        from ..data import eval_batches

        if self.test_dataset is None:
            raise ValueError("RankData: no test set; pass test=PATH (a built-in source "
                             "brings its own)")
        return eval_batches(self.test_dataset, self._rank, self._size, batch_size)

    def _stage(self, start_epoch: int) -> None:
        """Collective, once (Job.resume(), or the first epoch()): copy what this host reads
        in epochs [start_epoch, epochs)."""
        if not self.stage_dir or self.staging is not None:
            return
        from mpi4py import MPI

        from ..data.staging import stage_run

        # stage_run reads these fields of hpcaccel.train's config and World
        plan = types.SimpleNamespace(stage_dir=self.stage_dir, epochs=self.epochs,
                                     batch_size=self.batch_size, shuffle=self.shuffle,
                                     seed=self.seed)
        world = types.SimpleNamespace(node_name=MPI.Get_processor_name(),
                                      local_rank=self._local_rank, size=self._size)
        self.dataset, self.test_dataset, self.staging = _or_exit(
            self._control, stage_run, plan, self._control, world, self.dataset,
            self.test_dataset, start_epoch)
        self._reader = self._make_reader()
        _say(self._control, f"hpcaccel: stage_dir {self.stage_dir}: each host reads at most "
             f"{self.staging['train_files_per_host_max']} of {len(self.dataset.files)} "
             f"training file(s), staged in {self.staging['seconds_max']:.1f} s")


def _own(per_rank: list | None, rank: int, size: int) -> dict:
    """This rank's entry of a per-rank checkpoint field; rank 0's from another world size."""
    if not per_rank:
        return {}
    return dict(per_rank[rank] if len(per_rank) == size else per_rank[0])


@dataclass(frozen=True)
class Position:
    """Where training continues (Job.resume()): `epoch` (0-based) and `step`, the batches
    of that epoch already trained; `global_step`, steps over the whole run; `state`, what
    this rank passed to save() (empty for a new run)."""
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    state: dict = field(default_factory=dict)


class Job:
    """One training run in an output directory: checkpoints, resume, a clean stop on
    Slurm's signal, the stall watchdog and its hang report (docs/reliability.md)."""

    def __init__(self, out: str, model, optimizer, *, data: RankData | None = None,
                 epochs: int | None = None, resume: str = "auto", overwrite: bool = False,
                 keep: int = 2, stall_timeout: float = 300.0, stop_signals=STOP_SIGNALS):
        """Collective. Make it before training (a stop signal that comes earlier ends the
        process the default way).

        out: the run's directory: OUT/checkpoints/step-N.pt (hpcaccel's checkpoint format),
          OUT/run.json (whose run it is) and OUT/run.lock while it runs, as hpcaccel.train
          writes them; a second run on the same OUT is refused.
        model, optimizer: what checkpoints hold (the optimizer may be a
          DistributedOptimizer; its PowerSGD state is kept per rank; sharded, the whole
          state is saved, and each rank keeps its part at resume, at any world size).
        data: the RankData trained on; save() then knows the position, resume() restarts
          the data at it, and the run's identity includes the data and global batch.
        epochs: the run's length (default: data.epochs), recorded in OUT/run.json.
        resume: "auto" continues this run's newest checkpoint in OUT (a new run if there
          is none); "none" starts a new run and refuses an OUT that holds another; or a
          checkpoint file. As hpcaccel.train's --resume.
        overwrite: move another run's outputs in OUT to OUT/previous/<run id>/ instead of
          refusing to start.
        keep: how many of the newest checkpoints stay.
        stall_timeout: seconds without should_stop() or heartbeat() (from resume() on)
          after which the watchdog writes the hang report (OUT/hang-report.txt: which rank
          holds the job up) and ends every rank; 0 turns it off.
        stop_signals: the signals that ask for a stop (SIGUSR1: Slurm's warning before the
          time limit, SIGTERM: preemption, scancel).

        Refusals (another run's OUT, a checkpoint of another model) end every rank with
        one line from rank 0 and exit code 2."""
        from .. import checkpoint, rundir

        rt = runtime()
        self._control = control = rt.control
        self.stop = StopRequest(stop_signals)  # first: a signal during set-up counts
        self.out, self.model, self.optimizer, self.data = out, model, optimizer, data
        self.keep = keep
        self.epochs = epochs if epochs is not None else getattr(data, "epochs", None)
        # the optimizer's reducer holds per-rank state where it compresses with PowerSGD
        self._reducer = getattr(optimizer, "_hvd_reducer", None)
        reducer_state = self._reducer.state_dict() if self._reducer is not None else {}
        self._required = checkpoint.requirements(model, optimizer, reducer_state, rt.size)
        mine = rundir.identity(model, data.dataset if data is not None else None,
                               data.batch_size * rt.size if data is not None else None,
                               self.epochs)
        _or_exit(control, _in_script_words, control.collectively, rundir.check_paths, out, {})
        self.claim = _or_exit(control, _in_script_words, rundir.claim_shared, control, out,
                              resume, overwrite, mine, self._required,
                              info=(lambda line: print(_script_words(line), flush=True))
                              if control.is_main else lambda line: None)
        self.global_step = 0
        self.stall_timeout = stall_timeout
        self.watchdog = None  # started by resume(), once loading and staging are done
        self._closed = False

    # -- starting -------------------------------------------------------------------------
    def resume(self) -> Position:
        """Collective: restore the run's newest checkpoint (model, optimizer, every rank's
        RNG state, the optimizer's reducer state, the data position) if OUT has one, stage
        the data (stage_dir), start the stall watchdog, and return where to continue;
        Position() for a new run. Call it once, before training."""
        from ..watchdog import start_watchdog

        if self.watchdog is not None:
            raise RuntimeError("Job.resume() is called once, before training")
        control = self._control
        position = self._restore()
        if self.data is not None:  # node-local staging of what the epochs left read
            self.data._stage(position.epoch)
        self.watchdog = start_watchdog(self.stall_timeout, self.out, control.rank,
                                       control.size, control.abort)
        return position

    def _restore(self) -> Position:
        from .. import checkpoint

        path = self.claim.checkpoint
        if path is None:
            return Position()
        control = self._control
        state = _or_exit(control, _in_script_words, control.collectively, checkpoint.load, path,
                         self._required)
        self.model.load_state_dict(state["model"])
        # the reducer's state first: it may lay its buckets out anew (the checkpoint's size),
        # and a sharded optimizer then keeps its part of the whole state in the new ones
        checkpoint.restore_rank_state(state, self._reducer, control.rank, control.size,
                                      reseed=1_000_003 + control.rank)
        self.optimizer.load_state_dict(state["optimizer"])  # sharded: this rank's part kept
        self.global_step = state["global_step"]
        epoch, step = state["epoch"], state["step_in_epoch"]
        if self.data is not None:
            self.data.resume_at(epoch, step)
        _say(control, f"hpcaccel: resuming from {path} (epoch {epoch + 1}, step {step} of it, "
             f"global step {self.global_step})")
        return Position(epoch, step, self.global_step, _own(state.get("script_state"),
                                                             control.rank, control.size))

    # -- every step -----------------------------------------------------------------------
    def should_stop(self) -> bool:
        """Collective, once per step on every rank, after optimizer.step(): votes on the
        stop signals, counts the step and tells the watchdog this rank completed it. True
        on every rank at the same step when any rank got a signal (even one that reached
        only one rank): then checkpoint_and_exit(), or save(). One 8-byte allreduce."""
        # The vote is part of the step: a rank stuck in it has completed the step before,
        # so a hang report tells a rank that skipped the vote (a step further) from the
        # ranks waiting in it.
        flag = self._control.allreduce([self.stop.local_flag()], "max")[0]
        self.global_step += 1
        self._beat()
        return self.stop.agreed(flag)

    def heartbeat(self, what: str = "training") -> None:
        """Local. Tell the watchdog this rank makes progress and what it does now (a hang
        report shows it): inside long phases of your own, e.g. evaluation."""
        self._beat(what)

    def _beat(self, what: str = "training") -> None:
        if self.watchdog is not None:
            self.watchdog.beat(self.global_step, what)

    # -- checkpoints ----------------------------------------------------------------------
    def save(self, state: dict | None = None, *, epoch: int | None = None,
             step: int | None = None) -> str | None:
        """Collective: a checkpoint of the model, the optimizer, every rank's RNG state and
        the position, in hpcaccel's checkpoint format. Rank 0 writes it atomically (temp
        file, fsync, rename: a crash keeps the previous one) while the others wait idly;
        the newest `keep` stay. Returns its path on rank 0, None on the others.

        state: this rank's own small values to resume with (tensors, numbers, strings,
          lists, dicts: what torch.load(weights_only=True) reads), e.g. a partial epoch's
          loss sum or an LR scheduler's state_dict(); resume() gives each rank its own back
          as Position.state (rank 0's when the world size changed).
        epoch, step: the position to continue from (`step` batches of `epoch` trained);
          default: the data's, after the last batch data.epoch() handed out, or the next
          epoch's start once a loop over data.epoch() has ended."""
        from .. import checkpoint

        if self.watchdog is None:
            raise RuntimeError("Job.save() before Job.resume(): call resume() once before "
                               "training, so a run continues its checkpoint instead of "
                               "overwriting it")
        if epoch is None and step is None:
            if self.data is None:
                raise ValueError("Job.save(): pass epoch= and step= (or give the Job data=)")
            epoch, step = self.data.position
        elif epoch is None or step is None:
            raise ValueError("Job.save(): pass both epoch= and step=, or neither")
        self._beat("checkpoint")
        reducer_state = self._reducer.state_dict() if self._reducer is not None else {}
        # a sharded DistributedOptimizer holds the whole state on rank 0 while it saves
        whole = (self.optimizer._hvd_whole_state() if self._reducer is not None
                 else contextlib.nullcontext())
        with whole:
            path = checkpoint.save_collectively(
                self._control, self.out, self.keep, self.model, self.optimizer, epoch, step,
                self.global_step,
                per_rank={"reducer": reducer_state, "script_state": dict(state or {})})
        self._beat()
        return path

    def checkpoint_and_exit(self, state: dict | None = None):
        """Collective, after should_stop() said True: save(state), close(), and end the
        process with exit code 3 ("checkpointed, requeue me": the Slurm templates requeue
        the job, and the same command continues from the checkpoint)."""
        path = self.save(state)
        _say(self._control, f"hpcaccel: stopped by {self.stop.name} after step "
             f"{self.global_step}; checkpoint {path}; the same command continues from it")
        self.close()
        raise SystemExit(REQUEUE_EXIT_CODE)

    # -- the end --------------------------------------------------------------------------
    def close(self) -> None:
        """Local: stop the watchdog, release OUT's lock, and ignore further stop signals
        (the run is over: Slurm's and the batch script's signals must not turn exit code 0
        or 3 into death by signal). Idempotent; `with hvd.Job(...) as job:` calls it."""
        if self._closed:
            return
        self._closed = True
        if self.watchdog is not None:
            self.watchdog.stop()
        self.stop.ignore_further()
        self.claim.release()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
