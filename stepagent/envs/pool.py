"""A pool of environment worker processes, each owning one ``TextEnv``.

Why processes: ScienceWorld steps run in a JVM behind py4j; one env per process lets
``num_workers`` episodes advance in parallel while the trainer batches the policy's
generations. Requests go out to every addressed worker first and answers are
collected afterwards, so the workers overlap.

Failure model (nothing may hang a training run):

* the env raises (e.g. py4j lost its JVM): the worker closes the env, builds a new one
  (new JVM on next use) and answers a ``crashed`` result;
* the worker process dies or stays silent for ``step_timeout_s``: the pool kills it
  together with its child processes (the JVM), starts a fresh worker in that slot and
  answers the same ``crashed`` result.

A crashed result ends the episode (``done=True, crashed=True``, score 0); the caller
``reset``s the slot to play on. Workers are started with the "spawn" method and import
only ``stepagent.envs`` and ``stepagent.data.trajectory`` (no torch), so they start fast.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import sys
import time
import traceback
import types
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import psutil

from stepagent.data.trajectory import Trajectory
from stepagent.envs.base import ExpertFailure, StepResult, TaskInstance, TextEnv

log = logging.getLogger(__name__)

# Worker replies: (kind, value) with kind in OK / FAILURE (an ExpertFailure) / CRASHED.
OK, FAILURE, CRASHED = "ok", "expert_failure", "crashed"


# --------------------------------------------------------------------------- worker process
def _short_error(e: BaseException, limit: int = 200) -> str:
    lines = str(e).strip().splitlines()
    return (f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__)[:limit]


def _close_quietly(env: Optional[TextEnv]) -> None:
    if env is not None:
        try:
            env.close()
        except Exception:
            pass


def _handle(env: TextEnv, cmd: str, payload: Any) -> Tuple[str, Any]:
    if cmd == "reset":
        return OK, env.reset(payload)
    if cmd == "step":
        return OK, env.step(payload)
    if cmd == "expert":
        try:
            return OK, env.expert_trajectory(payload)
        except ExpertFailure as e:
            # Sent as plain fields: exceptions with custom __init__ do not unpickle faithfully.
            return FAILURE, (e.reason, e.detail)
    if cmd == "jvm_pid":
        fn = getattr(env, "jvm_pid", None)
        return OK, fn() if callable(fn) else None
    raise ValueError(f"unknown worker command {cmd!r}")


def _worker_main(conn: Connection, env_factory: Callable[[], TextEnv]) -> None:
    """Serve requests until "close" or until the parent goes away (EOF on the pipe)."""
    # Ctrl-C reaches the whole process group, and SLURM sends SIGTERM (and with --signal, SIGUSR1)
    # to every process of the job: the parent decides how to shut workers down (it checkpoints
    # first). Ignored signals stay ignored in the JVM a worker starts (Java keeps SIGTERM ignored).
    for name in ("SIGINT", "SIGTERM", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    env: Optional[TextEnv] = None
    try:
        while True:
            try:
                cmd, payload = conn.recv()
            except (EOFError, OSError):
                return
            if cmd == "close":
                _close_quietly(env)
                env = None
                conn.send((OK, None))
                return
            try:
                if env is None:
                    env = env_factory()
                reply = _handle(env, cmd, payload)
            except Exception as e:
                # The simulator is in an unknown state (or gone): replace it before the next request.
                reply = (CRASHED, (_short_error(e), traceback.format_exc()))
                _close_quietly(env)
                env = None
            conn.send(reply)
    finally:
        _close_quietly(env)


# --------------------------------------------------------------------------- pool (parent side)
@dataclass
class _Worker:
    process: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    handle: Optional[psutil.Process]  # taken at start: kill() then refuses a reused pid
    # Child processes seen under this worker (its JVM), remembered so that they can be
    # killed even after the worker itself died and they were re-parented.
    children: List[psutil.Process] = field(default_factory=list)


def crashed_result(error: str, detail: str = "") -> StepResult:
    return StepResult(
        observation=f"[environment crashed: {error}]",
        score=0.0,
        done=True,
        info={"error": detail or error},
        crashed=True,
    )


@contextlib.contextmanager
def _main_module_hidden(target_module: str) -> Iterator[None]:
    """Keep "spawn" from re-importing the parent's ``__main__`` in the worker.

    Spawned children normally re-run the parent's main module (e.g. a training script
    that imports torch: seconds and hundreds of MB per worker). Workers only need
    ``stepagent.envs``; when the env factory does not live in ``__main__`` we show
    ``multiprocessing`` an empty ``__main__`` while the child is being started.
    """
    main = sys.modules.get("__main__")
    if main is None or target_module == "__main__":
        yield
        return
    stub = types.ModuleType("__main__")
    stub.__spec__ = None
    sys.modules["__main__"] = stub
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _factory_module(env_factory: Callable[..., Any]) -> str:
    fn = getattr(env_factory, "func", env_factory)  # functools.partial -> wrapped callable
    return getattr(fn, "__module__", "__main__") or "__main__"


def _is_running(p: psutil.Process) -> bool:
    # A killed process that is not our child stays a zombie until its new parent reaps it;
    # it holds no resources any more, so it counts as gone.
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_processes(procs: Sequence[psutil.Process], timeout: float = 5.0) -> None:
    """SIGKILL ``procs`` and wait until they are gone (or zombies), at most ``timeout`` s."""
    alive = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()  # psutil refuses if the pid was reused by another process
            alive.append(p)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _is_running(p)]
        if alive:
            time.sleep(0.02)


class EnvPool:
    """``num_workers`` processes, addressed by slot 0..num_workers-1, each with one ``TextEnv``."""

    def __init__(self, env_factory: Callable[[], TextEnv], num_workers: int, step_timeout_s: float = 120.0):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.env_factory = env_factory
        self.num_workers = num_workers
        self.step_timeout_s = float(step_timeout_s)
        self._ctx = mp.get_context("spawn")
        self._workers: List[_Worker] = [self._start_worker() for _ in range(num_workers)]
        self._episode: List[Optional[str]] = [None] * num_workers  # instance id per slot, for logs
        self._closed = False

    # -- context manager
    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # -- worker lifecycle
    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=_worker_main, args=(child_conn, self.env_factory), daemon=True)
        with _main_module_hidden(_factory_module(self.env_factory)):
            process.start()
        child_conn.close()  # the parent keeps only its end, so a dead worker reads as EOF
        try:
            handle: Optional[psutil.Process] = psutil.Process(process.pid)
        except psutil.Error:  # died at once; the first request will report it
            handle = None
        return _Worker(process, parent_conn, handle)

    def _remember_children(self, slot: int) -> None:
        w = self._workers[slot]
        if w.handle is None:
            return
        with contextlib.suppress(psutil.Error):
            known = {p.pid for p in w.children}
            w.children += [p for p in w.handle.children(recursive=True) if p.pid not in known]

    def _kill_worker(self, slot: int) -> None:
        w = self._workers[slot]
        children = list(w.children)
        if w.handle is not None and w.process.exitcode is None:
            with contextlib.suppress(psutil.Error):
                children += w.handle.children(recursive=True)
        # The worker itself is reaped by multiprocessing (join), its children by psutil.
        with contextlib.suppress(OSError):
            w.process.kill()
        _kill_processes(children)
        w.process.join(timeout=5)
        w.conn.close()

    def _restart(self, slot: int, why: str) -> None:
        log.warning(
            "env worker slot %d (instance %s): %s; killing it and starting a new worker",
            slot, self._episode[slot], why,
        )
        self._kill_worker(slot)
        self._workers[slot] = self._start_worker()

    def worker_pids(self) -> List[int]:
        return [w.process.pid for w in self._workers]

    def jvm_pids(self) -> List[Optional[int]]:
        """Each slot's simulator process id (None where the env has none, or not started yet)."""
        replies = self._call("jvm_pid", [(slot, None) for slot in range(self.num_workers)])
        return [value if kind == OK else None for kind, value in replies]

    # -- request / reply
    def _send(self, slot: int, cmd: str, payload: Any) -> Optional[str]:
        """Send a request; returns an error text if the worker is already gone."""
        try:
            self._workers[slot].conn.send((cmd, payload))
            return None
        except (OSError, ValueError) as e:  # BrokenPipeError, or a closed connection
            return f"worker unreachable ({_short_error(e)})"

    def _receive(self, slot: int, deadline: float) -> Tuple[str, Any]:
        """The worker's reply, or (CRASHED, ...) after restarting a dead or silent worker."""
        conn = self._workers[slot].conn
        try:
            if conn.poll(max(0.0, deadline - time.monotonic())):
                return conn.recv()
            why = f"no answer within {self.step_timeout_s:.0f}s"
        except (EOFError, OSError) as e:
            code = self._workers[slot].process.exitcode
            why = f"worker process died (exit code {code}, {type(e).__name__})"
        self._restart(slot, why)
        return CRASHED, (why, why)

    def _call(self, cmd: str, items: Sequence[Tuple[int, Any]]) -> List[Tuple[str, Any]]:
        """Send ``cmd`` to every slot in ``items`` first, then collect the replies in order."""
        if self._closed:
            raise RuntimeError("EnvPool is closed")
        slots = [slot for slot, _ in items]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one batch: {slots}")
        for slot in slots:
            if not 0 <= slot < self.num_workers:
                raise ValueError(f"slot {slot} out of range 0..{self.num_workers - 1}")
        send_errors = {slot: self._send(slot, cmd, payload) for slot, payload in items}
        deadline = time.monotonic() + self.step_timeout_s
        replies: List[Tuple[str, Any]] = []
        for slot in slots:
            if send_errors[slot] is not None:
                self._restart(slot, send_errors[slot])
                replies.append((CRASHED, (send_errors[slot], send_errors[slot])))
            else:
                replies.append(self._receive(slot, deadline))
        return replies

    def _to_step_result(self, slot: int, kind: str, value: Any) -> StepResult:
        if kind == CRASHED:
            error, detail = value
            log.warning("env slot %d (instance %s) crashed: %s", slot, self._episode[slot], error)
            return crashed_result(error, detail)
        return value

    # -- episodes
    def reset_batch(self, items: Sequence[Tuple[int, TaskInstance]]) -> List[StepResult]:
        """Start an episode in each slot; ``observation`` is the instruction text."""
        for slot, inst in items:
            self._episode[slot] = inst.id
        out = []
        for (slot, _), (kind, value) in zip(items, self._call("reset", items)):
            if kind == OK:
                self._remember_children(slot)  # the JVM exists now
                out.append(StepResult(observation=value, score=0.0, done=False))
            else:
                out.append(self._to_step_result(slot, kind, value))
        return out

    def step_batch(self, items: Sequence[Tuple[int, str]]) -> List[StepResult]:
        return [self._to_step_result(slot, kind, value)
                for (slot, _), (kind, value) in zip(items, self._call("step", items))]

    # -- expert trajectories
    def map_experts(
        self, instances: Sequence[TaskInstance], progress: bool = True
    ) -> Iterator[Tuple[TaskInstance, Union[Trajectory, ExpertFailure]]]:
        """Expert trajectories in completion order, keeping every worker busy.

        A worker crash or timeout yields ``ExpertFailure("simulator_crash", ...)`` for its
        instance. If the caller stops iterating early, workers still busy are restarted
        (their late replies would otherwise be read as answers to later requests).
        """
        from tqdm.auto import tqdm

        pending: Deque[TaskInstance] = deque(instances)
        busy: Dict[int, Tuple[TaskInstance, float]] = {}  # slot -> (instance, deadline)
        bar = tqdm(total=len(pending), desc="expert trajectories", disable=not progress)

        def dispatch(slot: int) -> Optional[Tuple[TaskInstance, ExpertFailure]]:
            inst = pending.popleft()
            self._episode[slot] = inst.id
            error = self._send(slot, "expert", inst)
            if error is not None:
                self._restart(slot, error)
                return inst, ExpertFailure("simulator_crash", error)
            busy[slot] = (inst, time.monotonic() + self.step_timeout_s)
            return None

        def refill(slot: int) -> Iterator[Tuple[TaskInstance, ExpertFailure]]:
            while pending and slot not in busy:
                failed = dispatch(slot)
                if failed is not None:
                    yield failed

        try:
            for slot in range(self.num_workers):
                for failed in refill(slot):
                    bar.update(1)
                    yield failed
            while busy:
                by_conn = {self._workers[s].conn: s for s in busy}
                timeout = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
                ready = wait(list(by_conn), timeout=timeout)
                finished = [by_conn[c] for c in ready]
                finished += [s for s, (_, d) in busy.items() if s not in finished and time.monotonic() >= d]
                for slot in finished:
                    inst, deadline = busy.pop(slot)
                    kind, value = self._receive(slot, deadline)
                    if kind == OK:
                        self._remember_children(slot)
                        result: Union[Trajectory, ExpertFailure] = value
                    elif kind == FAILURE:
                        result = ExpertFailure(*value)
                    else:
                        log.warning("expert for %s: simulator crashed in slot %d: %s", inst.id, slot, value[0])
                        result = ExpertFailure("simulator_crash", value[0])
                    bar.update(1)
                    yield inst, result
                    for failed in refill(slot):
                        bar.update(1)
                        yield failed
        finally:
            bar.close()
            for slot in list(busy):
                self._restart(slot, "expert request abandoned by the caller")

    # -- shutdown
    def close(self) -> None:
        """Stop every worker and its simulator; kill whatever does not exit in time."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for slot, w in enumerate(self._workers):
            self._remember_children(slot)
            with contextlib.suppress(OSError, ValueError):
                w.conn.send(("close", None))
        deadline = time.monotonic() + 15.0
        for w in self._workers:
            w.process.join(timeout=max(0.1, deadline - time.monotonic()))
        for slot in range(self.num_workers):
            self._kill_worker(slot)  # no-op for processes that already exited
