"""``skipvision serve MODEL``: an OpenAI-compatible chat-completions server for a saved Skip-Vision (or vanilla)
checkpoint.

It is transformers' own server (``transformers serve``: FastAPI + uvicorn, ``transformers.cli.serving``), built by
HF's ``Serve``, with HF's model manager and chat handler subclassed rather than rewritten:

- the model manager loads the checkpoint through ``skipvision.from_pretrained`` (the Skip-Vision class, so prefill
  runs Skip-FFN and decoding the Skip KV-cache) and the processor through ``skipvision.load_processor``, and refuses
  to start, in one line, when the checkpoint's saved processor and its ``skip_vision`` settings disagree or a test
  generation with a test image fails;
- the chat handler checks a request before HF's code runs on it (messages, images, token budget, sampling
  parameters) and answers 4xx with a clear message where HF's would answer 500 with a traceback; a streaming
  request's first tokens are generated before the response starts, so a failure there is an error status too.

HF's app is then run by a uvicorn server of ours, in the main thread: a bounded graceful shutdown, and SIGTERM ends
the process with exit code 0. Generation itself is HF's: one request at a time per model on HF's inference thread,
``model.generate`` with HF's streamer. Requires the ``serve`` extra (fastapi, uvicorn, pydantic, openai).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextvars
import functools
import io
import json
import logging
import os
import signal
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import skipvision

from ..mixing import mixed_class

logger = logging.getLogger("skipvision.serve")

# A remote image gets this long to arrive (HF's loader has no timeout: a stalled URL would hang the request).
IMAGE_FETCH_TIMEOUT_S = 10.0
# OpenAI's documented ranges, narrowed where HF's mapping needs it: HF turns frequency_penalty f into
# repetition_penalty 1 + f, which must be positive.
TEMPERATURE_RANGE = (0.0, 2.0)
FREQUENCY_PENALTY_RANGE = (-1.0, 2.0)


DESCRIPTION = "an OpenAI-compatible chat-completions server (transformers' own) for a saved Skip-Vision checkpoint"


class StartupError(Exception):
    """Why the server refuses to start; printed as one line, without a traceback."""


class BadRequest(Exception):
    """A request the server will not run; answered with status 400 and this message."""


@dataclass
class RequestState:
    """What the checks found in one request, for the later steps of HF's handler (same task, so a context
    variable carries it there without changing HF's call signatures)."""

    images: list[Any] = field(default_factory=list)
    max_tokens: int | None = None
    # "prepare" until HF starts generating: an exception before that comes from the request's content (400),
    # one after it from the server (500).
    phase: str = "prepare"


_REQUEST: contextvars.ContextVar[RequestState] = contextvars.ContextVar("skipvision_serve_request")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``skipvision serve``."""
    parser.add_argument("model", help="checkpoint directory (a saved Skip-Vision or vanilla model and its processor)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="listen port (default: 8000)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:0', ... (default: auto)")
    parser.add_argument(
        "--dtype", default="auto", help="'auto' (the checkpoint's), 'float32', 'bfloat16', 'float16' (default: auto)"
    )
    parser.add_argument("--attn-implementation", default=None, help="e.g. 'sdpa' or 'eager' (default: HF's choice)")
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=30.0,
        help="seconds that requests in flight get to finish after SIGTERM or Ctrl-C (default: 30)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error"), help="(default: warning)"
    )
    parser.add_argument("--enable-cors", action="store_true", help="allow requests from any origin")
    parser.add_argument("--seed", type=int, default=None, help="torch seed set once at start (for sampling)")


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="skipvision serve", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


class _Terminated(BaseException):
    """Raised by our SIGTERM handler outside uvicorn's own (while the model loads, and when uvicorn re-raises the
    signal after its graceful shutdown), so that SIGTERM ends the process with exit code 0. A BaseException, as
    KeyboardInterrupt is, so that no ``except Exception`` on the way turns it into an error."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def run(args: argparse.Namespace) -> int:
    """Load and check the model, then serve until SIGTERM or Ctrl-C. Returns the exit code: 0 after a shutdown by
    signal, 2 when the server refuses to start (the reason printed in one line), uvicorn's code otherwise."""
    # uvicorn re-raises SIGTERM once it has shut down; with the default handler that would kill the process
    # (exit -15) after a clean shutdown, and during the model load it would skip the one-line exit.
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        _build(args).run()
        return 0
    except StartupError as e:
        print(f"skipvision serve: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except (_Terminated, KeyboardInterrupt):
        return 0
    except SystemExit as e:  # uvicorn exits with its own code when it cannot start (e.g. the port is taken)
        return e.code if isinstance(e.code, int) else 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _build(args: argparse.Namespace) -> Any:
    """HF's ``Serve`` assembled with our model manager and chat handler, and a uvicorn server of ours for its app."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise StartupError(
            "skipvision serve needs fastapi, uvicorn, pydantic and openai: pip install 'skipvision[serve]'"
        )
    try:
        import uvicorn
        from transformers.cli.serving import chat_completion, model_manager
    except ImportError as e:  # a transformers without the serving package (it appeared in the 5.x series)
        raise StartupError(f"this transformers has no serving package transformers.cli.serving ({e})") from e

    model = os.fspath(args.model)
    local = os.path.isabs(model) or model.startswith((".", "~")) or model.count("/") != 1  # not a hub id
    if local and not os.path.isdir(os.path.expanduser(model)):
        raise StartupError(f"{model}: no such checkpoint directory")
    classes = _server_classes()
    Serve = classes["Serve"]
    # HF's Serve imports its manager and handler classes from these modules when it runs, so they are swapped for
    # ours only while it builds the app.
    saved = (model_manager.ModelManager, chat_completion.ChatCompletionHandler)
    model_manager.ModelManager = classes["ModelManager"]
    chat_completion.ChatCompletionHandler = classes["ChatCompletionHandler"]
    try:
        serve = Serve(
            force_model=model,
            device=args.device,
            dtype=args.dtype,
            attn_implementation=args.attn_implementation,
            host=args.host,
            port=args.port,
            enable_cors=args.enable_cors,
            log_level=args.log_level,
            default_seed=args.seed,
            non_blocking=True,  # our Serve does not start; the uvicorn server below runs in the main thread
        )
    except StartupError:
        raise
    except Exception as e:  # a checkpoint that is missing or not a supported model, a bad --dtype, ...
        raise StartupError(f"cannot serve {args.model}: {type(e).__name__}: {e}") from e
    finally:
        model_manager.ModelManager, chat_completion.ChatCompletionHandler = saved
    app = serve.server.config.app
    _add_error_handlers(app)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
    )
    return _listening_server(uvicorn, model)(config)


def _listening_server(uvicorn: Any, model: str) -> type:
    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:  # said once the socket is bound (uvicorn says it only at log level info)
                config = self.config
                print(
                    f"skipvision serve: {model} on http://{config.host}:{config.port}/v1", file=sys.stderr, flush=True
                )

    return Server


def _add_error_handlers(app: Any) -> None:
    """OpenAI's error shape for HF's HTTP errors, and 400 (as OpenAI answers) for a body that is not a JSON object,
    where FastAPI answers 422 with its validation report."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException  # FastAPI's and the router's (404, 405)

    @app.exception_handler(HTTPException)
    async def _http_error(_request: Any, exc: HTTPException) -> Any:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request: Any, exc: RequestValidationError) -> Any:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            reason = (first.get("ctx") or {}).get("error", "")
            return error_response(400, f"the request body is not valid JSON{f': {reason}' if reason else ''}")
        return error_response(400, "the request body must be a JSON object")


def error_response(status: int, message: str) -> Any:
    """``{"error": {"message", "type", "code"}}``, the shape OpenAI's clients read the message from."""
    from fastapi.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


# HF's serving classes import fastapi, uvicorn and openai, which ``skipvision`` does not need otherwise: our changes
# are mixins here, mixed over HF's classes on first use (``_server_classes``).
class _ServeMixin:
    """Mixed over HF's ``Serve``."""

    def start_server(self) -> None:
        """HF's starts uvicorn in a thread, where it cannot take signals; ``run`` starts it in the main thread."""


class _ModelManagerMixin:
    """Loads the one checkpoint the server is pinned to as its Skip-Vision class with its own processor, and
    checks that they agree before the server starts."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.checked: dict[str, ServedModel] = {}
        super().__init__(*args, **kwargs)  # HF preloads the pinned model here

    def _path(self, model_id_and_revision: str) -> tuple[str, str]:
        path, _, revision = model_id_and_revision.rpartition("@")
        return path, revision

    def _load_processor(self, model_id_and_revision: str, gguf_file: str | None = None) -> Any:
        path, _ = self._path(model_id_and_revision)
        processor = skipvision.load_processor(path)
        check_saved_processor(path, processor)
        return processor

    def _load_model(self, model_id_and_revision: str, *args: Any, **kwargs: Any) -> Any:
        path, revision = self._path(model_id_and_revision)
        options: dict[str, Any] = {"dtype": self.dtype, "device_map": self.device}
        if self.attn_implementation is not None:
            options["attn_implementation"] = self.attn_implementation
        if revision != "main":
            options["revision"] = revision
        quantization = self.get_quantization_config()
        if quantization is not None:
            options["quantization_config"] = quantization
        # vanilla=True: a checkpoint without settings is served as the unmodified model (HF's numbers exactly)
        return skipvision.from_pretrained(path, vanilla=True, **options).eval()

    def load_model_and_processor(self, model_id_and_revision: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if self.force_model is not None:
            pinned = self.process_model_name(self.force_model)
            if model_id_and_revision != pinned:  # HF's /load_model would load any model a client names
                raise ValueError(f"this server serves only {self.force_model!r}")
        model, processor = super().load_model_and_processor(model_id_and_revision, *args, **kwargs)
        if model_id_and_revision not in self.checked:
            self.checked[model_id_and_revision] = check_served_model(model, processor)
        return model, processor

    async def load_model_streaming(self, model_id_and_revision: str, *args: Any, **kwargs: Any) -> Any:
        # HF's /load_model: for another model, one error event instead of HF's logged traceback
        if self.force_model is not None and model_id_and_revision != self.process_model_name(self.force_model):
            message = f"this server serves only {self.force_model!r}"
            yield f"data: {json.dumps({'status': 'error', 'model': model_id_and_revision, 'message': message})}\n\n"
            return
        async for event in super().load_model_streaming(model_id_and_revision, *args, **kwargs):
            yield event

    @classmethod
    def get_model_modality(cls, model: Any, processor: Any = None) -> Any:
        # HF finds the modality from the class name in its Auto mappings, where the Skip-Vision classes are not
        from transformers.cli.serving.utils import Modality

        if isinstance(model, skipvision.SkipVisionMixin):
            return Modality.VLM
        return super().get_model_modality(model, processor)

    def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
        # HF lists the models in the hub cache; this server answers for its one model only
        return [{"id": self.force_model, "object": "model", "owned_by": "skipvision", "created": 0}]


class _ChatHandlerMixin:
    """HF's handler behind checks that turn the requests HF would fail on into 4xx answers."""

    async def handle_request(self, body: dict, request_id: str) -> Any:
        from fastapi import HTTPException
        from fastapi.responses import StreamingResponse

        try:
            # in a worker thread: fetching and decoding images would hold up every other request
            state = await asyncio.to_thread(check_request, body, self._served())
        except BadRequest as e:
            return error_response(400, str(e))
        token = _REQUEST.set(state)
        try:
            response = await super().handle_request(body, request_id)
        except HTTPException:
            raise
        except BadRequest as e:
            return error_response(400, str(e))
        except Exception as e:
            if state.phase == "prepare":  # the chat template, the processor, HF's parsing of the request
                return error_response(400, f"invalid request: {_one_line(str(e)) or type(e).__name__}")
            logger.exception("generation failed for request %s", request_id)
            return error_response(500, f"generation failed: {type(e).__name__}: {_one_line(str(e))}")
        finally:
            _REQUEST.reset(token)
        if isinstance(response, StreamingResponse):
            return await _start_stream(response)
        return response

    def _served(self) -> ServedModel | None:
        return next(iter(self.model_manager.checked.values()), None)

    def get_processor_inputs_from_messages(self, messages: list[dict], modality: Any) -> list[dict]:
        # HF hands the processor each image's URL to load again; hand it the image the checks already loaded
        inputs = super().get_processor_inputs_from_messages(messages, modality)
        state = _REQUEST.get(None)
        if state is not None:
            images = iter(state.images)
            for message in inputs:
                for part in message["content"] if isinstance(message["content"], list) else ():
                    image = next(images, None) if part.get("type") == "image" else None
                    if image is not None:
                        part.pop("url", None)
                        part["image"] = image
        return inputs

    def _build_generation_config(self, body: dict, model_generation_config: Any, use_cb: bool = False) -> Any:
        config = super()._build_generation_config(body, model_generation_config, use_cb=use_cb)
        served = self._served()
        if served is not None and served.image_token_id is not None:
            # never generate an image placeholder (as `skipvision generate` does)
            config.suppress_tokens = sorted({*(config.suppress_tokens or ()), served.image_token_id})
        try:
            config.validate()
        except ValueError as e:
            raise BadRequest(f"invalid generation settings: {_one_line(str(e))}") from e
        return config

    def _streaming(
        self, request_id: str, model: Any, processor: Any, model_id: str, inputs: Any, gen_config: Any, **kw: Any
    ) -> Any:
        fit_context(inputs, gen_config, self._served())
        _REQUEST.get().phase = "generate"
        tokenizer = getattr(processor, "tokenizer", processor)  # see _non_streaming
        return super()._streaming(request_id, model, tokenizer, model_id, inputs, gen_config, **kw)

    async def _non_streaming(
        self, request_id: str, model: Any, processor: Any, model_id: str, inputs: Any, gen_config: Any, **kw: Any
    ) -> Any:
        fit_context(inputs, gen_config, self._served())
        _REQUEST.get().phase = "generate"
        # The inputs are processed; from here HF uses the processor only to decode and passes it to generate as
        # its `tokenizer`, which stop strings (`stop`) need to be a tokenizer (a processor fails there).
        tokenizer = getattr(processor, "tokenizer", processor)
        return await super()._non_streaming(request_id, model, tokenizer, model_id, inputs, gen_config, **kw)


@functools.cache
def _server_classes() -> dict[str, type]:
    """HF's ``Serve``, ``ModelManager`` and ``ChatCompletionHandler`` with our mixins over them."""
    from transformers.cli.serve import Serve
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.model_manager import ModelManager

    return {
        "Serve": mixed_class(_ServeMixin, Serve),
        "ModelManager": mixed_class(_ModelManagerMixin, ModelManager),
        "ChatCompletionHandler": mixed_class(_ChatHandlerMixin, ChatCompletionHandler),
    }


# --- startup checks -------------------------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """What the request checks need to know about the served model."""

    context: int | None  # the language model's position limit (prompt + new tokens), None when it states none
    min_image_side: int  # smaller images hold less than one patch of the vision tower
    image_token_id: int | None
    image_token: str | None  # the placeholder text the processor expands; in a request's text it has no image


def _test_image() -> Any:
    from PIL import Image

    # not square, so tiling processors (LLaVA-NeXT) and dynamic-resolution ones (Qwen-VL) take their usual path
    return Image.new("RGB", (224, 168), (120, 80, 200))


def _image_placeholders(processor: Any) -> int:
    """How many image placeholder tokens ``processor`` writes for the test image in a one-turn chat."""
    chat = [{"role": "user", "content": [{"type": "image", "image": _test_image()}, {"type": "text", "text": "?"}]}]
    inputs = processor.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return int((inputs["input_ids"] == _image_token_id(processor)).sum())


def _image_token_id(processor: Any) -> int:
    token_id = getattr(processor, "image_token_id", None)
    return token_id if token_id is not None else processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def check_saved_processor(path: str, processor: Any) -> None:
    """Refuse a checkpoint whose saved processor writes another image placeholder count than its ``skip_vision``
    settings need (e.g. a processor saved for other settings, or the base model's processor copied next to a
    Skip-Vision model: HF's own server and ``pipeline`` would load that one and fail on every image).

    ``processor`` is ``skipvision.load_processor(path)``, set up from config.json. The saved files are compared
    with what saving that processor writes, so families whose saved processor does not carry the count (it is set
    up again at load) are compared like for like."""
    from transformers import AutoProcessor

    import skipvision

    try:
        saved = AutoProcessor.from_pretrained(path)
    except Exception:
        # processors that HF cannot load without torchvision (an image-only save): skipvision's loader reads
        # them, and the test generation below checks the processor it built against the model
        return
    with tempfile.TemporaryDirectory() as tmp:
        skipvision.save_processor(processor, tmp)
        expected = _image_placeholders(AutoProcessor.from_pretrained(tmp))
    found = _image_placeholders(saved)
    if found != expected:
        settings = skipvision.checkpoint_skip_vision(path)
        described = "no skip_vision settings (vanilla)" if settings is None else f"skip_vision {_describe(settings)}"
        raise StartupError(
            f"{path}: its saved processor writes {found} image placeholder tokens for an image where the model's "
            f"{described} needs {expected}; the processor was saved for other settings. Save the matching one with "
            f"skipvision.save_processor(skipvision.load_processor(path), path)"
        )


def _describe(settings: Any) -> str:
    fields = ("layout", "num_retained", "num_skipped", "summary_tokens")
    return "(" + ", ".join(f"{name}={getattr(settings, name)!r}" for name in fields) + ")"


def check_served_model(model: Any, processor: Any) -> ServedModel:
    """One greedy token for a chat with the test image through the served processor and model, before the server
    starts: whatever would fail every image request (placeholder count, image token, pixel shape) fails here."""
    import torch

    chat = [{"role": "user", "content": [{"type": "image", "image": _test_image()}, {"type": "text", "text": "?"}]}]
    try:
        inputs = processor.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(model.device)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    except Exception as e:
        raise StartupError(
            f"{model.name_or_path}: the model and its processor do not work together: a test generation with one "
            f"image failed: {type(e).__name__}: {e}"
        ) from e
    text = model.config.get_text_config()
    context = getattr(text, "max_position_embeddings", None)
    vision = getattr(model.config, "vision_config", None)
    patch = getattr(vision, "patch_size", None)
    return ServedModel(
        context=int(context) if isinstance(context, int) else None,
        min_image_side=patch if isinstance(patch, int) and patch > 0 else 1,
        image_token_id=_image_token_id(processor),
        image_token=getattr(processor, "image_token", None),
    )


# --- request checks -------------------------------------------------------------------------------------------------

TEXT_PARTS = ("text", "input_text", "output_text")
IMAGE_PARTS = ("image_url", "input_image")


def check_request(body: dict, served: ServedModel | None) -> RequestState:
    """Raise ``BadRequest`` for what HF's handler would fail on with a 500 (or silently mis-serve); load the
    request's images. Returns what the later steps need."""
    state = RequestState()
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list of chat messages")
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"message {i} must be an object with a string `role`")
        content = message.get("content")
        if "tool_calls" in message or content is None:
            continue  # HF ignores the content of a message with tool calls
        if isinstance(content, str):
            _check_text(content, f"message {i}", served)
            continue
        if not isinstance(content, list):
            raise BadRequest(f"message {i}: `content` must be a string or a list of content parts")
        for j, part in enumerate(content, 1):
            kind = part.get("type") if isinstance(part, dict) else None
            where = f"message {i}, content part {j}"
            if kind in TEXT_PARTS:
                if not isinstance(part.get("text"), str):
                    raise BadRequest(f"{where}: a text part needs a string `text`")
                _check_text(part["text"], where, served)
            elif kind in IMAGE_PARTS:
                url = part.get(kind)
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise BadRequest(f"{where}: an image part needs `{kind}` with a string `url`")
                state.images.append(load_request_image(url, f"{where} (image {len(state.images) + 1})", served))
            else:
                raise BadRequest(f"{where}: content type {kind!r} is not supported; this server takes text and images")
    state.max_tokens = _max_tokens(body, served)
    _check_sampling(body)
    return state


def _check_text(text: str, where: str, served: ServedModel | None) -> None:
    # The processor would expand a typed placeholder as if an image stood there: depending on the transformers
    # version it refuses (500 in HF's server) or the model fails on the placeholder count.
    token = served.image_token if served is not None else None
    if token and token in text:
        raise BadRequest(f"{where}: the text contains the image placeholder {token!r}; send images as image_url parts")


def load_request_image(url: str, where: str, served: ServedModel | None) -> Any:
    """The image a data URL, an http(s) URL, a file:// URL or a server-side path names, as an RGB PIL image, or
    ``BadRequest`` saying why not."""
    from PIL import Image, UnidentifiedImageError
    from transformers.image_utils import load_image

    try:
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            if not header.endswith(";base64"):
                raise BadRequest(f"{where}: a data URL must be base64 (data:image/png;base64,...)")
            try:
                data = base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise BadRequest(f"{where}: the data URL is not valid base64") from e
            image = Image.open(io.BytesIO(data))
        elif url.startswith("file://"):
            # HF's loader takes plain paths but reads a file:// URL as base64
            image = Image.open(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        else:
            image = load_image(url, timeout=IMAGE_FETCH_TIMEOUT_S)
        image.load()  # decode now: a truncated file fails here, not in the processor
        image = image.convert("RGB")
    except BadRequest:
        raise
    except Exception as e:
        # PIL names the in-memory file object in its message, which says nothing to the client
        reason = (
            "not an image file PIL can decode" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        )
        raise BadRequest(f"{where} could not be read as an image ({_one_line(reason)[:200]})") from e
    min_side = served.min_image_side if served is not None else 1
    if min(image.size) < min_side:
        raise BadRequest(
            f"{where} is {image.size[0]}x{image.size[1]} pixels; this model needs at least {min_side}x{min_side} "
            "(one patch of its vision tower)"
        )
    return image


def _max_tokens(body: dict, served: ServedModel | None) -> int | None:
    # HF reads max_completion_tokens first, then max_tokens
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"`{name}` must be a positive integer, got {value!r}")
    context = served.context if served is not None else None
    if context is not None and value >= context:
        raise BadRequest(f"`{name}`={value} does not fit this model's context of {context} tokens")
    return value


def _check_sampling(body: dict) -> None:
    def number(name: str, low: float, high: float, low_open: bool = False) -> None:
        value = body.get(name)
        if value is None:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not (low < value if low_open else low <= value) or value > high:
            bound = "(" if low_open else "["
            raise BadRequest(f"`{name}` must be a number in {bound}{low}, {high}], got {value!r}")

    number("temperature", *TEMPERATURE_RANGE)
    number("top_p", 0.0, 1.0, low_open=True)
    number("frequency_penalty", *FREQUENCY_PENALTY_RANGE, low_open=True)
    n = body.get("n")
    if n is not None and n != 1:
        raise BadRequest("`n` must be 1: the server returns one choice per request")
    if body.get("logprobs"):
        raise BadRequest("`logprobs` is not supported by this server")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise BadRequest("`stop` must be a string or a list of strings")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or not all(str(k).isdigit() for k in bias):
            raise BadRequest("`logit_bias` must map token ids to numbers")
    config = body.get("generation_config")
    if config is not None:
        try:
            if not isinstance(json.loads(config), dict):
                raise ValueError
        except (TypeError, ValueError) as e:
            raise BadRequest("`generation_config` must be a JSON object in a string") from e


def fit_context(inputs: Any, gen_config: Any, served: ServedModel | None) -> None:
    """Prompt plus new tokens within the model's positions: a request's own ``max_tokens`` must fit (400
    otherwise, as OpenAI answers), HF's default (1024 or the model's) is cut to what is left."""
    context = served.context if served is not None else None
    if context is None:
        return
    prompt = int(inputs["input_ids"].shape[-1])
    if prompt >= context:
        raise BadRequest(
            f"the prompt is {prompt} tokens (image placeholders included), more than this model's context of "
            f"{context} tokens"
        )
    requested = _REQUEST.get().max_tokens
    if requested is None:
        gen_config.max_new_tokens = min(gen_config.max_new_tokens or context, context - prompt)
    elif prompt + requested > context:
        raise BadRequest(
            f"the prompt ({prompt} tokens, image placeholders included) plus max_tokens={requested} is more than "
            f"this model's context of {context} tokens"
        )


async def _start_stream(response: Any) -> Any:
    """Run a streaming response up to its first generated text before answering, so that a generation that fails
    at once is an error status rather than an error event inside a 200 stream."""
    from fastapi.responses import StreamingResponse

    chunks = response.body_iterator
    head: list[Any] = []
    try:
        head.append(await chunks.__anext__())  # HF's first chunk: the assistant role, sent before generation
        head.append(await chunks.__anext__())  # the first text, the end of an empty answer, or HF's error event
    except StopAsyncIteration:
        pass
    except BaseException:
        await chunks.aclose()  # the client went away: HF's generator cancels the generation
        raise
    text = head[-1] if head and isinstance(head[-1], str) else ""
    prefix = 'data: {"error": "'
    if text.startswith(prefix):
        await chunks.aclose()
        # HF writes the message into the JSON unescaped, so it is cut out rather than parsed
        message = text[len(prefix) :].rstrip().removesuffix('"}')
        return error_response(500, f"generation failed: {_one_line(message)}")

    async def stream() -> Any:
        try:
            for chunk in head:
                yield chunk
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    return StreamingResponse(stream(), media_type="text/event-stream")


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
