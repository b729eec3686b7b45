"""The native decode step: every decoder layer of a decoding step in one C++ call, on CPU.

Decoding a token on a CPU is dispatch-bound: through PyTorch a layer is about 150 small
operators, and their Python and dispatcher overhead costs as much as the matrix products.
``native_decode.cpp`` runs the layers of a step whose rows each decode one token (batch-1
decoding, and the engine's decode-only steps) in C++: the matrix products call the same
PyTorch kernels on the same weights; norms, rotary embedding, the KV-cache writes,
attention (PyTorch's fused kernel for one sequence whose slots are consecutive) and SiLU
are its own loops. Prompt chunks keep the PyTorch path.

The source is compiled on first use with PyTorch's C++ extension builder (the machine's
C++ compiler and ninja; about 30 seconds, once per machine and PyTorch version, cached
under ``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``). Where it cannot be
built, decoding takes the PyTorch path and a warning says why. ``TOKENGUARD_NATIVE=0``
turns it off; ``make`` builds it ahead of time (:func:`load_extension`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, cast

import torch

from tokenguard.runner.model.kv_cache import DecodeSlots
from tokenguard.runner.model.quant import DENSE_MIN_ROWS, Int4Linear, Int8Linear, Linear

if TYPE_CHECKING:
    from tokenguard.runner.model.llama import DecoderLayer, LlamaModel

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("native_decode.cpp")
DISABLE_ENV = "TOKENGUARD_NATIVE"

_INT4, _INT8, _DENSE = 0, 1, 2  # the C++ side's kinds of linear layer
# -fno-trapping-math lets the compiler vectorize loops with selects and divisions (exp,
# SiLU); unlike -ffast-math it changes no result.
_CFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-trapping-math")

_lock = threading.Lock()
_extension: ModuleType | None = None
_failure: str | None = None  # why it could not be built, once tried


def _build_name() -> str:
    """The extension's module name: a digest of its source, the PyTorch version, the
    Python, the compiler flags and this CPU's instruction sets (it is compiled with
    ``-march=native``, so a home directory shared by different machines must not share
    one build). A build of the same name is the same build."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                cpu += line
                break
    except OSError:
        pass
    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (torch.__version__, sys.implementation.cache_tag or "", " ".join(_CFLAGS), cpu):
        digest.update(b"\0" + part.encode())
    return f"tokenguard_native_decode_{digest.hexdigest()[:16]}"


def _build_root() -> Path:
    """Where PyTorch keeps compiled extensions: ``TORCH_EXTENSIONS_DIR``, else the user's cache."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def _import(name: str, library: Path) -> ModuleType | None:
    """The extension ``name`` from ``library`` (milliseconds; asking PyTorch's builder
    whether a build is up to date takes half a second), or None if there is none or it
    does not load (then it is built again)."""
    if not library.is_file():
        return None
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        logger.debug("could not load %s (%s); building it again", library, e)
        return None
    return module


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """One builder at a time across processes. The kernel drops an ``flock`` when its
    process dies, so a build killed halfway (Ctrl-C during a first start) leaves no lock
    behind for the next one to wait on forever."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds may overlap; each writes its own scratch folder
        yield
        return
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load_or_build() -> ModuleType:
    """The extension from its cached build, else built now: in a scratch folder, then moved
    into place in one rename, so a reader never sees half a library. A failed build leaves
    its reason in ``failed.txt`` beside it, and later processes do not try again until
    that file is deleted."""
    name = _build_name()
    folder = _build_root() / name
    library = folder / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"
    module = _import(name, library)
    if module is not None:
        return module
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / "build.lock"):
        module = _import(name, library)  # built by another process while this one waited
        if module is not None:
            return module
        failed = folder / "failed.txt"
        if failed.is_file():
            raise RuntimeError(f"an earlier build failed ({failed.read_text().strip()}); delete {failed} to try again")
        from torch.utils import cpp_extension

        logger.info("building the native decode step (once per machine, about 30 s)")
        scratch = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
        try:
            module = cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(_CFLAGS),
                                        build_directory=str(scratch), verbose=False)
            os.replace(scratch / library.name, library)
        except Exception as e:
            failed.write_text(_reason(e) + "\n")
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return module


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def load_extension() -> ModuleType | None:
    """The compiled extension, built on the first call on a machine; None (with a warning,
    once a process) where it cannot be built, or when ``TOKENGUARD_NATIVE=0``."""
    global _extension, _failure
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if _extension is None and _failure is None:
            try:
                _extension = _load_or_build()
            except Exception as e:  # noqa: BLE001 - any failure to build falls back to PyTorch
                _failure = _reason(e)
                logger.warning("the native decode step could not be built (%s); decoding runs on the slower "
                               "PyTorch path. It needs a C++ compiler and ninja (pip install ninja); set %s=0 to "
                               "skip it.", _failure, DISABLE_ENV)
        return _extension


class NativeDecode:
    """A model's layers as the extension takes them: per layer two norm weights and four
    linear layers (kind, packed weight, scales, dense copy). Bound to the model's current
    tensors: rebuild it when they move or change."""

    def __init__(self, model: LlamaModel, extension: ModuleType) -> None:
        self._extension = extension
        config = model.config
        self._heads, self._kv_heads = config.num_heads, config.num_kv_heads
        layers = _layers(model)
        self._eps = layers[0].attention_norm.eps
        self._norms: list[torch.Tensor] = []
        self._kinds: list[int] = []
        self._as: list[torch.Tensor] = []
        self._bs: list[torch.Tensor] = []
        self._denses: list[torch.Tensor] = []
        for layer in layers:
            self._norms += [layer.attention_norm.weight.detach().float().contiguous(),
                            layer.ffn_norm.weight.detach().float().contiguous()]
            for linear in (layer.wqkv, layer.wo, layer.w13, layer.w2):
                kind, a, b, dense = _describe(linear)
                self._kinds.append(kind)
                self._as.append(a)
                self._bs.append(b)
                self._denses.append(dense)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: DecodeSlots) -> torch.Tensor:
        """``x [B, hidden]`` (float32) through every layer; ``cos``/``sin [B, head_dim]``
        float32 (``sin`` signed, see :func:`~tokenguard.runner.model.llama.apply_rope`)."""
        out: torch.Tensor = self._extension.decode_layers(
            x, cos, sin, self._norms, self._kinds, self._as, self._bs, self._denses, slots.keys, slots.values,
            slots.write, slots.context, slots.lengths, self._heads, self._kv_heads, self._eps, DENSE_MIN_ROWS)
        return out


def native_decode_for(model: LlamaModel) -> NativeDecode | None:
    """The native decode step of ``model``, or None where it does not apply: not on CPU,
    a layer of a kind the extension does not take (a float16 or mixed-format projection),
    an odd head size, or the extension cannot be built."""
    config, dtype = model.config, model.dtype
    if model.inv_freq.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None
    if config.head_dim % 2 or config.num_heads % config.num_kv_heads:
        return None
    for layer in _layers(model):
        for linear in (layer.wqkv, layer.wo, layer.w13, layer.w2):
            if type(linear) not in (Linear, Int4Linear, Int8Linear):
                return None
    extension = load_extension()
    return None if extension is None else NativeDecode(model, extension)


def _layers(model: LlamaModel) -> list[DecoderLayer]:
    return cast("list[DecoderLayer]", list(model.layers))


def _describe(linear: torch.nn.Module) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]:
    if isinstance(linear, Int4Linear):
        return _INT4, linear.packed, linear.scales_and_zeros, linear.dense
    if isinstance(linear, Int8Linear):
        return _INT8, linear.weight, linear.scales, linear.dense
    assert isinstance(linear, Linear)
    weight = linear.weight.detach()
    return _DENSE, weight, weight, weight

