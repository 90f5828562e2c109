"""Typed message headers exchanged between the processes (msgpack via msgspec).

Every message is ``[header, *payload_frames]`` (see channel.py): the header is one of the
structs below; tensors and bodies ride in the payload frames or in shared memory, never
inside the header and never through pickle.
"""

from __future__ import annotations

import msgspec

from splitserve.replies import Stage
from splitserve.stats import EngineStats, FrontStats


class TensorRef(msgspec.Struct, array_like=True, frozen=True):
    """Where a tensor's bytes are: payload frame ``frame``, or a shared-memory segment."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    frame: int = -1
    segment: str = ""
    nbytes: int = 0


# front <-> CPU worker


class Job(msgspec.Struct, tag="job", array_like=True):
    """One HTTP request for a service; the body is payload frame 0.

    With ``model`` set, the request calls that engine model of the service directly: the
    body is a tensor bundle (splitserve.tensors) and so is the answer. A ``traced`` job
    is answered with its stages (``JobReply.stages``); others record none.
    """

    id: int
    service: str
    content_type: str
    deadline: float  # time.monotonic() seconds (one clock for every process of a host)
    headers: dict[str, str] = {}
    model: str = ""
    traced: bool = False


class Cancel(msgspec.Struct, tag="cancel", array_like=True):
    """The front no longer needs job ``id`` (its deadline passed, or its client left).

    The worker cancels the job's task, which cancels its engine calls; it still answers
    with a JobReply (status 499), which is what frees the job's slot in the front.
    """

    id: int


class JobReply(msgspec.Struct, tag="job_reply", array_like=True):
    """The answer to a Job; the body is payload frame 0."""

    id: int
    status: int
    content_type: str
    timings: dict[str, float] = {}
    headers: dict[str, str] = {}
    stages: list[Stage] = []  # a traced job's: the job, its engine calls within it


class WorkerHello(msgspec.Struct, tag="hello", array_like=True):
    """A CPU worker announcing itself (and how many jobs it takes at once) to the front."""

    index: int
    pid: int
    capacity: int


# CPU worker <-> engine


class InferRequest(msgspec.Struct, tag="infer", array_like=True):
    id: int
    model: str
    deadline: float
    tensors: list[TensorRef]
    traced: bool = False  # answer with the engine's stages (InferReply.stages)


class CancelInfer(msgspec.Struct, tag="cancel_infer", array_like=True):
    """The caller of request ``id`` gave up: drop its rows if no batch has taken them.

    The engine answers a dropped request with an ``EngineError`` of kind "cancelled", so
    the caller learns when its input segments are free again; rows already in a batch
    run and are answered as usual.
    """

    id: int


class EngineError(msgspec.Struct, array_like=True, frozen=True):
    """Why an engine did not answer a request with tensors: HTTP status, kind, message."""

    status: int
    kind: str
    message: str


class InferReply(msgspec.Struct, tag="infer_reply", array_like=True):
    id: int
    tensors: list[TensorRef] = []
    error: EngineError | None = None
    queue_ms: float = 0.0
    infer_ms: float = 0.0
    batch_size: int = 0
    simulated: bool = False  # the answer came from the simulated accelerator
    stages: list[Stage] = []  # a traced request's: queue, compute (per batch it ran in)


class EngineHello(msgspec.Struct, tag="engine_hello", array_like=True):
    """A CPU worker's first message to an engine: how many jobs it holds at most."""

    capacity: int


class EngineWelcome(msgspec.Struct, tag="engine_welcome", array_like=True):
    """An engine's answer to EngineHello: it is alive and reads this connection.

    A worker sends calls only after it: a process being killed can still accept a
    connection (its listening socket outlives the one it just lost), and calls sent
    there would die with it.
    """

    pid: int


class Release(msgspec.Struct, tag="release", array_like=True):
    """The reader is done with these segments of the receiver's pool."""

    segments: list[str]


# children <-> supervisor


class ChildReady(msgspec.Struct, tag="ready", array_like=True):
    role: str
    index: int
    pid: int


class ServerState(msgspec.Struct, tag="state", array_like=True):
    """Broadcast by the supervisor on every change and periodically (late joiners).

    ``engines`` / ``workers`` map a child's index to its pid when it is up and ready,
    to 0 otherwise; a changed pid tells a peer that the child was restarted.
    """

    engines: dict[int, int]
    workers: dict[int, int]
    engine_stats: list[EngineStats] = []
    restarts: dict[str, int] = {}  # by role ("engine", "worker", "front")
    fronts: dict[int, int] = {}
    # every front's latest counts, and those of fronts that died (pid 0), for the
    # server-wide totals that any front answers (protocol/metrics.py:FrontCounters)
    front_stats: list[FrontStats] = []

    @property
    def ready(self) -> bool:
        return all(self.engines.values()) and any(self.workers.values())


FrontMessage = Job | JobReply | WorkerHello | Cancel
EngineMessage = InferRequest | InferReply | Release | EngineHello | EngineWelcome | CancelInfer
ControlMessage = ChildReady | ServerState | EngineStats | FrontStats

encode = msgspec.msgpack.Encoder().encode
front_decoder = msgspec.msgpack.Decoder(FrontMessage)
engine_decoder = msgspec.msgpack.Decoder(EngineMessage)
control_decoder = msgspec.msgpack.Decoder(ControlMessage)
