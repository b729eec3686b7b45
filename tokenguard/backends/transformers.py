"""A backend on Hugging Face ``transformers``: a local model folder (or an object)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenguard.backends.base import Backend, BackendUsage, Chunk, Params, aiter_in_thread
from tokenguard.errors import ConfigError, InvalidRequest, MissingDependency

if TYPE_CHECKING:
    from tokenguard.tokens import Message, Tokenizer

__all__ = ["Transformers"]

# Our parameter names -> generate()'s; anything else is passed through unchanged.
_PARAM_NAMES = {"max_tokens": "max_new_tokens"}
_ACCEPTED = frozenset({"max_tokens", "temperature", "top_p", "top_k", "repetition_penalty"})


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingDependency("transformers", "pip install 'tokenguard[reference]'") from None
    return transformers


def _local_folder(model: str) -> Path | None:
    """The folder of a local model path, or of a hub model already in the local cache."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a hub name): no folder
        return None


class Transformers(Backend):
    """Generate with a ``transformers`` causal LM, streaming through
    ``TextIteratorStreamer``. Loads with ``local_files_only=True``: nothing downloads.

    ``model_or_path`` is a local folder, a hub name already in the local cache, or a
    loaded ``PreTrainedModel`` (then pass its ``tokenizer`` object too). The guard meters
    with tokenguard's reading of the same ``tokenizer.json`` and chat template.
    """

    name = "transformers"
    #: Sampling only when a ``temperature`` above 0 is given.
    greedy_by_default = True

    def __init__(
        self,
        model_or_path: Any,
        *,
        tokenizer: Any = None,
        device: str = "auto",
        dtype: str = "auto",
        **load_kwargs: Any,
    ) -> None:
        self._source = model_or_path
        self._hf_tokenizer = tokenizer
        self._model: Any = None if isinstance(model_or_path, (str, Path)) else model_or_path
        if self._model is not None and tokenizer is None:
            raise ConfigError("pass tokenizer= with a loaded model")
        self.device = device
        self.dtype = dtype
        self.load_kwargs = load_kwargs
        self.model: str | None
        if isinstance(model_or_path, (str, Path)):
            self.model = str(model_or_path)
        else:
            self.model = getattr(getattr(model_or_path, "config", None), "_name_or_path", None) or None
        self._lock = threading.Lock()

    def cache_identity(self) -> object:
        return [self.name, self.model, self.dtype]

    def warmup(self) -> None:
        """Load the model and its tokenizer (once), before a call's clock starts."""
        self._load()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None or self._hf_tokenizer is None:
                tf = _transformers()
                source = str(self._source)
                if self._hf_tokenizer is None:
                    self._hf_tokenizer = tf.AutoTokenizer.from_pretrained(source, local_files_only=True)
                if self._model is None:
                    kwargs: dict[str, Any] = {"local_files_only": True, **self.load_kwargs}
                    if self.dtype != "auto":
                        import torch

                        kwargs["dtype"] = getattr(torch, self.dtype)
                    model = tf.AutoModelForCausalLM.from_pretrained(source, **kwargs)
                    model.to(self._device())
                    model.eval()
                    self._model = model
        return self._model, self._hf_tokenizer

    def _device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def tokenizer(self) -> Tokenizer | None:
        from tokenguard.tokens import HFTokenizer

        folder = _local_folder(str(self._source)) if isinstance(self._source, (str, Path)) else None
        if folder is None:
            path = getattr(self._hf_tokenizer, "name_or_path", None)
            folder = _local_folder(path) if path else None
        if folder is None or not (folder / "tokenizer.json").is_file():
            return None
        # transformers 5 saves the chat template beside the config, not inside it.
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else None
        return HFTokenizer.from_file(folder, chat_template=template)

    def _inputs(self, tok: Any, messages: Sequence[Message], device: Any) -> Any:
        encoded = tok.apply_chat_template(
            list(messages), add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return {k: v.to(device) for k, v in encoded.items()}

    def check_params(self, params: Params) -> None:
        """``generate`` takes these (``max_tokens`` as ``max_new_tokens``); anything else,
        or a value that is no number where one is due, is refused before the call."""
        unknown = sorted(set(params) - _ACCEPTED)
        if unknown:
            raise InvalidRequest(f"the transformers backend does not take {', '.join(map(repr, unknown))}; "
                                 f"it takes {', '.join(sorted(_ACCEPTED))}")
        for name, value in params.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise InvalidRequest(f"{name} must be a number >= 0, got {value!r}")
        if params.get("max_tokens") == 0:
            raise InvalidRequest("max_tokens must be >= 1")

    def stream(self, messages: Sequence[Message], params: Params) -> Iterator[Chunk]:
        tf = _transformers()
        model, tok = self._load()
        inputs = self._inputs(tok, messages, model.device)
        prompt_len = int(inputs["input_ids"].shape[-1])
        cancelled = threading.Event()

        from transformers import StoppingCriteria  # present: _transformers() checked

        class _Cancel(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                import torch

                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool)

        kwargs: dict[str, Any] = {_PARAM_NAMES.get(k, k): v for k, v in params.items()}
        temperature = kwargs.pop("temperature", 0.0) or 0.0
        kwargs["do_sample"] = temperature > 0
        if temperature > 0:
            kwargs["temperature"] = temperature
        streamer = tf.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: dict[str, Any] = {}

        def generate() -> None:
            try:
                result["ids"] = model.generate(
                    **inputs,
                    streamer=streamer,
                    stopping_criteria=tf.StoppingCriteriaList([_Cancel()]),
                    pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                    **kwargs,
                )
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                result["error"] = error
                streamer.end()

        worker = threading.Thread(target=generate, name="tokenguard-transformers", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield Chunk(text=piece)
        finally:
            cancelled.set()
            worker.join()
        if "error" in result:
            raise result["error"]
        new_ids = result["ids"][0][prompt_len:].tolist()
        eos = tok.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos])
        max_new = kwargs.get("max_new_tokens")
        length = max_new is not None and len(new_ids) >= max_new and (not new_ids or new_ids[-1] not in eos_ids)
        yield Chunk(
            finish_reason="length" if length else "stop",
            usage=BackendUsage(prompt_len, len(new_ids), 0),
        )

    async def astream(self, messages: Sequence[Message], params: Params) -> AsyncIterator[Chunk]:
        async for chunk in aiter_in_thread(lambda: self.stream(messages, params)):
            yield chunk

    def __repr__(self) -> str:
        return f"Transformers({self.model!r})"
