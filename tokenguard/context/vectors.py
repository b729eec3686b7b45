"""FAISS indexes for the context strategies: on the GPU when FAISS sees one."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["flat_index", "gpu_count"]

_lock = threading.Lock()
_resources: Any = None


def gpu_count() -> int:
    """GPUs FAISS can use: 0 with the ``faiss-cpu`` wheel, or with no GPU."""
    import faiss

    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def flat_index(dim: int) -> Any:
    """An exact inner-product index of ``dim``-wide vectors (cosine, for unit vectors),
    moved to GPU 0 with one shared set of FAISS GPU resources when there is a GPU
    (``tokenguard[gpu]`` installs faiss-gpu); a CPU index otherwise."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    if gpu_count() == 0:
        return index
    global _resources
    with _lock:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(_resources, 0, index)
