"""Several processes training one model (one process per host or per GPU, as on a cluster): start-up with
bounded waits, one writer, and agreement on failures so no process waits forever for one that stopped.

    initialize(coordinator="node0:12355", num_processes=2, process_id=1, timeout_s=300)

* **Start.** Process 0 listens on the coordinator address; every other process connects within ``timeout_s``
  and reports its id and the number of processes it was started for. A coordinator that cannot be reached, a
  process count that differs, a process id used twice or a process that never comes is one `DistributedError`
  naming the processes, raised on every process that is up (`jax.distributed.initialize` alone aborts the
  process from C++ in those cases, or waits). Then `jax.distributed.initialize` runs with the same timeouts (its
  heartbeat timeout: a process silent that long stops the others). CPU collectives across processes use gloo
  (jax's default ``jax_cpu_collectives_implementation`` on CPU since 0.4.3x; set here explicitly).
* **Addresses and ids** come from the options, else ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
  ``JAX_PROCESS_ID``, else the cluster (SLURM: ``SLURM_PROCID``, ``SLURM_NTASKS``, the first node of the job;
  jax's own detection).
* **One writer.** Process 0 owns the run folder (`is_writer`); the others write nothing and receive the
  starting state (fresh or resumed from process 0's checkpoint) by `broadcast_tree`.
* **Agreement.** `agreement` wraps local work (reading the store, locking the run folder, ...): every process
  reaches its end and learns whether any process failed there, so a missing store on process 1 stops all of
  them with process 1's message instead of leaving the others inside the first collective.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

MESSAGE_BYTES = 2048  # longest failure message passed between processes


class DistributedError(RuntimeError):
    """Processes could not start together, or one of them stopped: the message names which and why."""


def active() -> bool:
    """True inside a run of several processes (after `initialize`)."""
    import jax

    return jax.process_count() > 1


def started() -> bool:
    """True after `jax.distributed.initialize` in this process (asks nothing of a backend)."""
    from jax._src import distributed as _jd

    return _jd.global_state.client is not None


def process_index() -> int:
    import jax

    return jax.process_index()


def is_writer() -> bool:
    """Process 0 owns the run folder (also True in a run of one process)."""
    return process_index() == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve(
    coordinator: str | None, num_processes: int | None, process_id: int | None, timeout_s: int
) -> tuple[str, int, int]:
    """(coordinator HOST:PORT, number of processes, this process's id) from the arguments, the JAX_*
    environment variables or the cluster scheduler (SLURM), in that order."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if None in (coordinator, num_processes, process_id):
        from jax._src.clusters import ClusterEnv  # jax's detection of SLURM, Open MPI, Kubernetes, ...

        coordinator, num_processes, process_id, _ = ClusterEnv.auto_detect_unset_distributed_params(
            coordinator, num_processes, process_id, None, None, timeout_s
        )
    missing = [
        name
        for name, v in (
            ("--coordinator (or JAX_COORDINATOR_ADDRESS)", coordinator),
            ("--num-processes (or JAX_NUM_PROCESSES)", num_processes),
            ("--process-id (or JAX_PROCESS_ID)", process_id),
        )
        if v is None
    ]
    if missing:
        raise ValueError(
            f"--distributed: no {', '.join(missing)} given and no cluster scheduler (SLURM) detected: set them for "
            "every process (see docs/cluster.md)"
        )
    num_processes, process_id = int(num_processes), int(process_id)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--distributed: process id {process_id} is not in 0..{num_processes - 1}")
    if ":" not in coordinator:
        raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT")
    return coordinator, num_processes, process_id


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"--coordinator {address!r}: the port is not a number") from None


def _send(sock: socket.socket, obj: dict) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def _receive(sock: socket.socket, deadline: float) -> dict | None:
    buf = b""
    while not buf.endswith(b"\n"):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(4096)
        except (TimeoutError, OSError):
            return None
        if not chunk:
            return None
        buf += chunk
    return json.loads(buf)


def rendezvous(coordinator: str, num_processes: int, process_id: int, timeout_s: float) -> None:
    """Meet every process on the coordinator's port before jax starts its service there: each reports (id,
    number of processes); process 0 answers all once all have come, or names what is wrong. Raises
    `DistributedError` on every process that is up, within ``timeout_s``."""
    if num_processes == 1:
        return
    host, port = _split(coordinator)
    deadline = time.monotonic() + timeout_s
    me = {"process_id": process_id, "num_processes": num_processes, "host": socket.gethostname()}
    if process_id == 0:
        server = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            server.bind(("", port))
        except OSError as e:
            raise DistributedError(f"process 0 cannot listen on the coordinator port {port}: {e.strerror}") from None
        server.listen(num_processes)
        peers: dict[int, tuple[socket.socket, dict]] = {}
        problems: list[str] = []
        try:
            while len(peers) < num_processes - 1 and time.monotonic() < deadline:
                server.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    conn, _ = server.accept()
                except (TimeoutError, OSError):
                    break
                msg = _receive(conn, deadline)
                if msg is None:
                    conn.close()
                    continue
                pid, n = int(msg["process_id"]), int(msg["num_processes"])
                if n != num_processes:
                    problems.append(
                        f"process {pid} on {msg['host']} was started for {n} processes, process 0 for {num_processes}"
                    )
                elif pid in peers or pid == 0:
                    problems.append(f"process id {pid} was given to two processes")
                elif not 0 < pid < num_processes:
                    problems.append(f"process id {pid} is not in 0..{num_processes - 1}")
                peers.setdefault(pid, (conn, msg))
                if problems:
                    break
            if not problems and len(peers) < num_processes - 1:
                missing = sorted(set(range(1, num_processes)) - set(peers))
                problems.append(
                    f"process(es) {', '.join(map(str, missing))} of {num_processes} did not reach the coordinator "
                    f"{coordinator} within {timeout_s:g} s"
                )
            reply = {"error": "; ".join(problems)} if problems else {"ok": True}
            for conn, _ in peers.values():
                with contextlib.suppress(OSError):
                    _send(conn, reply)
        finally:
            for conn, _ in peers.values():
                conn.close()
            server.close()
        if problems:
            raise DistributedError("; ".join(problems))
        return
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection((host, port), timeout=max(min(5.0, deadline - time.monotonic()), 0.01))
        except OSError as e:
            last = e.strerror or type(e).__name__
            time.sleep(0.2)
            continue
        with sock:
            _send(sock, me)
            reply = _receive(sock, deadline)
        if reply is None:
            last = "process 0 closed the connection without an answer"
            break
        if "error" in reply:
            raise DistributedError(f"process {process_id}: the coordinator refused the start: {reply['error']}")
        return
    raise DistributedError(
        f"process {process_id} of {num_processes}: the coordinator {coordinator} (process 0) cannot be reached "
        f"within {timeout_s:g} s ({last}): start process 0 there, or check the address and port"
    )


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> tuple[int, int]:
    """Start this process's part of a multi-process run; returns (process id, number of processes). Idempotent."""
    import jax
    from jax._src import distributed as _jd

    if _jd.global_state.client is not None:
        return jax.process_index(), jax.process_count()
    coordinator, num_processes, process_id = resolve(coordinator, num_processes, process_id, timeout_s)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # before any backend starts; CPU only
    rendezvous(coordinator, num_processes, process_id, timeout_s)
    jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        initialization_timeout=int(timeout_s),
        heartbeat_timeout_seconds=int(timeout_s),
    )
    if jax.process_count() != num_processes:  # cannot happen after the rendezvous; a last guard
        raise DistributedError(f"process {process_id}: expected {num_processes} processes, got {jax.process_count()}")
    return process_id, num_processes


def _encode(text: str) -> np.ndarray:
    raw = text.encode()[:MESSAGE_BYTES]
    out = np.zeros(MESSAGE_BYTES + 4, np.uint8)
    out[:4] = np.frombuffer(np.int32(len(raw)).tobytes(), np.uint8)
    out[4 : 4 + len(raw)] = np.frombuffer(raw, np.uint8)
    return out


def _decode(row: np.ndarray) -> str:
    n = int(np.frombuffer(np.asarray(row[:4], np.uint8).tobytes(), np.int32)[0])
    return bytes(np.asarray(row[4 : 4 + n], np.uint8)).decode(errors="replace")


def allgather_text(text: str) -> list[str]:
    """Every process's ``text`` (at most MESSAGE_BYTES bytes), in process order."""
    from jax.experimental import multihost_utils

    rows = np.asarray(multihost_utils.process_allgather(_encode(text)))
    return [_decode(r) for r in rows.reshape(-1, MESSAGE_BYTES + 4)]


@contextlib.contextmanager
def agreement(what: str) -> Iterator[None]:
    """Run the block's local work on every process, then agree: if it failed on any process, it fails on all,
    with the failing process's message (the failing process raises its own exception). The block must hold no
    collective operation. A no-op in a run of one process."""
    if not active():
        yield
        return
    error: BaseException | None = None
    try:
        yield
    except Exception as e:
        error = e
    text = "" if error is None else " ".join(str(error).split()) or type(error).__name__
    try:
        messages = allgather_text(text)
    except Exception as e:  # a process stopped without a word (killed, out of memory): its peers see it here
        if error is not None:
            raise error from None
        failure = collective_failure(e, during=f"while {what}")
        if failure is None:
            raise
        raise failure from e
    if error is not None:
        raise error
    failed = [(i, m) for i, m in enumerate(messages) if m]
    if failed:
        i, m = failed[0]
        raise DistributedError(f"process {i} of {len(messages)} stopped while {what}: {m}")


def broadcast_json(obj: Any) -> Any:
    """Process 0's JSON-serialisable ``obj`` on every process."""
    from jax.experimental import multihost_utils

    raw = json.dumps(obj).encode() if is_writer() else b""
    n = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(len(raw)))))
    buf = np.zeros(n, np.uint8)
    if is_writer():
        buf[:] = np.frombuffer(raw, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)).decode())


def broadcast_tree(tree: Any) -> Any:
    """Process 0's pytree of arrays (same structure, shapes and dtypes on every process) on every process,
    as numpy arrays."""
    import jax
    from jax.experimental import multihost_utils

    out = multihost_utils.broadcast_one_to_all(tree)
    return jax.tree_util.tree_map(np.asarray, out)


def to_host(tree: Any) -> Any:
    """Numpy copies of a pytree of replicated arrays, from this process's own devices (no communication)."""
    import jax

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


def collective_failure(
    error: BaseException, step: int | None = None, checkpoint: int | None = None, during: str = "during training"
) -> DistributedError | None:
    """A `DistributedError` for an exception from a collective whose peer went away (gloo, NCCL, the
    coordination service), else None. ``during``: when it happened ("during training": at ``step``, and the
    restart is a --resume from ``checkpoint``; else e.g. "while preparing the training")."""
    if isinstance(error, DistributedError):
        return None  # already says which process and why
    text = " ".join(str(error).split())
    signs = ("gloo", "nccl", "connection closed", "connection reset", "coordination service", "heartbeat")
    if not any(s in text.lower() for s in signs):
        return None
    first = text[:300] + ("…" if len(text) > 300 else "")
    training = during == "during training"
    return DistributedError(
        f"process {process_index()}: another process stopped {during}"
        + (f" (at step {step})" if step is not None else "")
        + f": {first}. Every process stops; start all of them again"
        + (" with --resume" if training else "")
        + (f" (the last checkpoint is at step {checkpoint})" if checkpoint is not None else "")
    )


def exit_now(code: int) -> None:
    """End a process of a multi-process run at once (after its error is printed): skips jax's shutdown barrier,
    which would wait for the processes that stopped, and closes the connections so the others fail fast."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
