"""What the commands share: the flags of `GenerationOptions` (declared once, in `qwen3_mlx/options.py`), the flags
of the CLI itself (system prompt, model placement, prompt cache files, the draft model), and loading a model."""

from __future__ import annotations

import functools
import inspect
import json
import typing
from dataclasses import dataclass
from pathlib import Path

import typer

from ..errors import Qwen3MLXError
from ..options import GenerationOptions
from .app import err, fail

# Help text is rich markup: a literal "[" must be written "\\[" or rich eats the tag.
SYSTEM = typer.Option(None, "--system", "-s", help="System prompt.")
PARALLEL = typer.Option(
    None, "--parallel", help="Under mlx.launch: 'pipeline' (each rank a block of layers, split by memory) or "
    "'tensor' (MoE: each rank a slice of every expert) \\[default: pipeline]."
)
SPLIT = typer.Option(
    None, "--split", help="Under mlx.launch with pipeline: layers per rank, e.g. 10,18 \\[default: by each host's "
    "memory]."
)

SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "repetition_penalty", "seed")
KV = ("kv_bits", "kv_group_size", "quantized_kv_start")
# Flags that set an option in another form than its own: (type, typer option).
_OTHER_FORMS = {
    "no_think": (bool, typer.Option(False, "--no-think", help="Thinking off (the template's hard switch).")),
    "chat_template_kwargs": (str, typer.Option(
        None, "--chat-template-kwargs", help="More variables for the model's chat template, as a JSON object, e.g. "
        "'{\"preserve_thinking\": true}' (Qwen3.6: keep earlier turns' reasoning).")),
}
THINKING = ("no_think", "thinking_budget", "reasoning_effort", "chat_template_kwargs")


@dataclass(frozen=True)
class ModelSource:
    """Where `generate` and `chat` get their model from (flags added by `with_options(..., source=True)`)."""

    draft_model: str | None = None
    prompt_cache: Path | None = None
    parallel: str | None = None
    split: str | None = None


DRAFT_HELP = (
    "A small model of the same family proposing tokens for the big one to check (speculative decoding: same "
    "output, fewer big-model steps), e.g. Qwen/Qwen3-0.6B for Qwen/Qwen3-8B; or mtp: the checkpoint's own "
    "multi-token-prediction head (Qwen3.5 / 3.6 / 3.8, Qwen3-Next), or a folder holding that head alone (qwen3-mlx "
    "quantize --mtp-drafter).")
_SOURCE_FLAGS = {
    "draft_model": (str, typer.Option(None, "--draft-model", help=DRAFT_HELP)),
    "prompt_cache": (Path, typer.Option(
        None, "--prompt-cache", help="A file from `qwen3-mlx cache-prompt`: start after its tokens (its system "
        "prompt applies unless --system is given).")),
    "parallel": (str, PARALLEL),
    "split": (str, SPLIT),
}


def _flag(name: str) -> tuple[type, typer.models.OptionInfo]:
    if name in _OTHER_FORMS:
        return _OTHER_FORMS[name]
    f = GenerationOptions.__dataclass_fields__[name]
    bounds = {k: f.metadata[k] for k in ("min", "max") if k in f.metadata}
    kind = typing.get_type_hints(GenerationOptions)[name]
    return kind, typer.Option(f.default, *f.metadata["flags"], help=f.metadata["help"], **bounds)


def _options(values: dict) -> GenerationOptions:
    if "no_think" in values:
        values["enable_thinking"] = not values.pop("no_think")
    if "chat_template_kwargs" in values:
        values["chat_template_kwargs"] = template_kwargs(values["chat_template_kwargs"])
    return GenerationOptions(**values)


def with_options(*names: str, source: bool = False):
    """Give a typer command the flags of these options (field names of `GenerationOptions`, or "no_think",
    "chat_template_kwargs"); it receives them as one `options: GenerationOptions` argument. With `source`, also
    the flags of a `ModelSource`, received as `source`."""
    flags = {n: _flag(n) for n in names} | (_SOURCE_FLAGS if source else {})
    hidden = ("options", "source")

    def wrap(command):
        signature = inspect.signature(command)
        own = [p for p in signature.parameters.values() if p.name not in hidden]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=flag, annotation=kind)
                 for n, (kind, flag) in flags.items()]

        @functools.wraps(command)
        def run(**kwargs):
            if source:
                kwargs["source"] = ModelSource(**{n: kwargs.pop(n) for n in _SOURCE_FLAGS})
            return command(options=_options({n: kwargs.pop(n) for n in names}), **kwargs)

        run.__signature__ = signature.replace(parameters=own + added)
        run.__annotations__ = {k: v for k, v in command.__annotations__.items() if k not in hidden}
        return run

    return wrap


def template_kwargs(text: str | None) -> dict:
    """--chat-template-kwargs as a dict (a domain error unless it is a JSON object)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise Qwen3MLXError(f"--chat-template-kwargs is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise Qwen3MLXError("--chat-template-kwargs must be a JSON object, e.g. '{\"preserve_thinking\": true}'")
    return value


def load_for_generation(model: str, options: GenerationOptions, source: ModelSource):
    """What `generate` and `chat` start from: the model and tokenizer, `options` with the --draft-model loaded
    (checked against the target) and validated, and the --prompt-cache file (or None)."""
    if source.prompt_cache is not None:
        refuse_distributed("--prompt-cache")
    llm, tokenizer = load_for_cli(model, parallel=source.parallel, split=source.split)
    options = with_draft(llm, tokenizer, options, source.draft_model)
    cached = None
    if source.prompt_cache is not None:
        from ..prompt_cache import load_prompt_cache

        cached = load_prompt_cache(source.prompt_cache, llm)
    from ..generate import template_variables

    template_variables(tokenizer, options)  # a template that ignores --reasoning-effort: refused before the chat
    return llm, tokenizer, options.validate(llm.args), cached


def with_draft(llm, tokenizer, options: GenerationOptions, draft_model: str | None) -> GenerationOptions:
    """`options` with --draft-model loaded: `mtp` (or a drafter folder) as the target's MTP head, else a model
    checked against the target (vocabulary and tokenizer)."""
    if draft_model == "mtp" or is_mtp_drafter(draft_model):
        from ..models.mtp import load_mtp

        return options.replace(draft_model=load_mtp(llm, None if draft_model == "mtp" else draft_model))
    if draft_model is not None:
        from ..speculative import check_draft

        draft, draft_tokenizer = load_for_cli(draft_model, local=True)
        check_draft(llm.args, draft.args, tokenizer, draft_tokenizer)
        return options.replace(draft_model=draft)
    return options


def is_mtp_drafter(path: str | None) -> bool:
    """Whether `path` is a folder holding an MTP head alone (`qwen3-mlx quantize --mtp-drafter`)."""
    config = Path(path).expanduser() / "config.json" if path else None
    try:
        return config is not None and config.is_file() and json.loads(config.read_text()).get("mtp_drafter") is True
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def load_for_cli(model: str, *, parallel: str | None = None, split: str | None = None, local: bool = False):
    """Load a model and its tokenizer, with a status line on stderr. Under `mlx.launch` (unless `local`), the
    model is spread over the ranks: rank 0 gets it, the other ranks serve it and exit when rank 0 is done."""
    from ..distributed import launched
    from ..loader import load
    from .app import show_progress

    if not local and launched():
        from .. import distributed

        return distributed.load(model, parallel=parallel or "pipeline", split=parse_split(split))
    if not local and (parallel is not None or split is not None):
        fail("--parallel and --split spread a model over several processes: start the command under mlx.launch, "
             "e.g. mlx.launch -n 2 -- qwen3-mlx generate MODEL --prompt Hi")
    if show_progress():
        with err.status(f"loading {model}"):
            return load(model)
    return load(model)


def parse_split(split: str | None) -> list[int] | None:
    """--split's layers per rank, e.g. "10,18" -> [10, 18]."""
    if split is None:
        return None
    try:
        return [int(x) for x in split.split(",")]
    except ValueError:
        fail(f"--split takes layers per rank separated by commas, e.g. 10,18; got {split!r}")


def refuse_distributed(option: str) -> None:
    """One clear error for an option a run across ranks does not support."""
    from ..distributed import launched

    if launched():
        fail(f"{option} is not supported under mlx.launch (each rank holds only part of the KV cache)")
