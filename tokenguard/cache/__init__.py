"""Request caches: a repeated question costs zero tokens, and never crosses tenants.

``Guard(cache=ExactCache(...))`` looks a call up after its prompt is fitted and before
any budget is reserved; a hit skips the backend, bills nothing and records what the
original call cost as savings. Successful replies are stored once they complete.
"""

from tokenguard.cache.details import same_details
from tokenguard.cache.entry import CachedAnswer
from tokenguard.cache.exact import ExactCache
from tokenguard.cache.key import CacheScope
from tokenguard.cache.semantic import SemanticCache

__all__ = ["CacheScope", "CachedAnswer", "ExactCache", "SemanticCache", "same_details"]
