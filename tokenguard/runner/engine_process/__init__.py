"""The serving engine in a process of its own, and the runner's handle on it.

:class:`EngineProcess` (:mod:`.client`) starts a fresh interpreter that builds the model
from an :class:`EngineRecipe` (:mod:`.recipe`) and runs the
:class:`~tokenguard.runner.engine.Engine` there (:mod:`.worker`); the two talk in pickled
frames over pipes (:mod:`.wire`), one message per engine step for all its sequences.
``LlamaRunner`` keeps tokenizing, detokenizing and its public API in the caller's process.
"""

from tokenguard.runner.engine_process.client import EngineProcess, RemoteSequence
from tokenguard.runner.engine_process.recipe import EngineRecipe

__all__ = ["EngineProcess", "EngineRecipe", "RemoteSequence"]
