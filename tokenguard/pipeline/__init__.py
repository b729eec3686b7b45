"""The guard's pipeline: :class:`Call`, the step protocols and one module per step.

A request's path (docs/architecture.md): admit, scope, fit, cache, reserve, generate (chunk
watchers), meter, settle, remember. :class:`~tokenguard.Guard` composes these; a
feature plugs in as a step of the matching protocol. :mod:`~tokenguard.pipeline.tree`
holds the call tree that nested calls and :func:`tokenguard.scope` build; step 2,
:class:`TrimForwarded` (module ``scope``), trims what nested calls forward.
"""

from tokenguard.pipeline.admit import Admit
from tokenguard.pipeline.call import Call, as_messages
from tokenguard.pipeline.deadline import with_deadline
from tokenguard.pipeline.fit import Fit
from tokenguard.pipeline.generate import Generation, Outcome
from tokenguard.pipeline.meter import Meter
from tokenguard.pipeline.output_cap import CapWatch, OutputCap
from tokenguard.pipeline.remember import RememberTurn
from tokenguard.pipeline.reserve import Reserve
from tokenguard.pipeline.scope import TrimForwarded
from tokenguard.pipeline.settle import Settle
from tokenguard.pipeline.steps import CacheStep, ChunkWatcher, FitStep, RememberStep, ScopeStep, Stop, Watch
from tokenguard.pipeline.stream import AsyncGuardStream, GuardStream, Opened
from tokenguard.pipeline.tree import DEFAULT_SHARE, Frame, Scope, current_frame, framed, running_frame

__all__ = [
    "DEFAULT_SHARE",
    "Admit",
    "AsyncGuardStream",
    "CacheStep",
    "Call",
    "CapWatch",
    "ChunkWatcher",
    "Fit",
    "FitStep",
    "Frame",
    "Generation",
    "GuardStream",
    "Meter",
    "Opened",
    "Outcome",
    "OutputCap",
    "RememberStep",
    "RememberTurn",
    "Reserve",
    "Scope",
    "ScopeStep",
    "Settle",
    "Stop",
    "TrimForwarded",
    "Watch",
    "as_messages",
    "current_frame",
    "framed",
    "running_frame",
    "with_deadline",
]
