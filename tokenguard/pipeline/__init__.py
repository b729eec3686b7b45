"""The guard's pipeline: :class:`Call`, the step protocols and one module per step.

A request's path (docs/architecture.md): admit, scope, fit, cache, reserve, generate (chunk
watchers), meter, settle, remember. :class:`~tokenguard.Guard` composes these; a
feature plugs in as a step of the matching protocol.
"""

from tokenguard.pipeline.admit import Admit
from tokenguard.pipeline.call import Call, as_messages
from tokenguard.pipeline.fit import Fit
from tokenguard.pipeline.generate import Generation, Outcome
from tokenguard.pipeline.meter import Meter
from tokenguard.pipeline.output_cap import CapWatch, OutputCap
from tokenguard.pipeline.remember import RememberTurn
from tokenguard.pipeline.reserve import Reserve
from tokenguard.pipeline.settle import Settle
from tokenguard.pipeline.steps import CacheStep, ChunkWatcher, FitStep, RememberStep, ScopeStep, Stop, Watch
from tokenguard.pipeline.stream import AsyncGuardStream, GuardStream, Opened

__all__ = [
    "Admit",
    "AsyncGuardStream",
    "CacheStep",
    "Call",
    "CapWatch",
    "ChunkWatcher",
    "Fit",
    "FitStep",
    "Generation",
    "GuardStream",
    "Meter",
    "Opened",
    "Outcome",
    "OutputCap",
    "RememberStep",
    "RememberTurn",
    "Reserve",
    "ScopeStep",
    "Settle",
    "Stop",
    "Watch",
    "as_messages",
]
