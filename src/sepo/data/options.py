"""How a stage reads preference data: one config section shared by every stage that takes ``data``."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from sepo.config import option, validate_choices
from sepo.errors import ConfigError

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 1024
FORMATS = ("auto", "standard", "conversational", "transcript", "pandalm", "llmbar", "judged")


@dataclass
class DataOptions:
    """Reading, normalising and tokenizing preference data (YAML section ``data_options``)."""

    split: str = option("train", "split of a hub dataset or of a local datasets folder (ignored for single files)")
    subset_name: str | None = option(None, "hub dataset configuration name (the second argument of load_dataset)")
    format: str = option("auto", "input format; auto detects it from the columns", choices=FORMATS)
    columns: dict[str, str] = option({}, "column mapping canonical=source, e.g. prompt=question,chosen=good,rejected=bad")
    on_invalid: str = option("error", "what to do with an unusable row: stop with an error naming it, or skip and count it",
                             choices=("error", "skip"))
    max_length: int | None = option(None, "longest prompt+response kept; responses are cut from the right (none: "
                                    f"{DEFAULT_MAX_LENGTH}, or the model's context when that is shorter)",
                                    unit="tokens")
    max_prompt_length: int | None = option(None, "longest prompt kept; prompts are cut from the left (None: half of "
                                           "max_length)", unit="tokens")
    chat_template: str = option("auto", "auto: the tokenizer's chat template when it has one; none: plain text; "
                                "anything else: a Jinja template string or a path to a .jinja file")
    num_proc: int | None = option(None, "worker processes for tokenization (None: one process)")

    def __post_init__(self):
        validate_choices(self)
        if self.max_length is None:  # fixed by with_lengths() once the model's context is known
            if self.max_prompt_length is not None and self.max_prompt_length < 1:
                raise ConfigError("data_options.max_prompt_length must be >= 1")
            return
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2
        if self.max_prompt_length < 1 or self.max_length < 2:
            raise ConfigError("data_options.max_length must be >= 2 and data_options.max_prompt_length >= 1")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"data_options.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                              f"data_options.max_length ({self.max_length}) to leave room for the response")


_said: set[tuple[int, str]] = set()


def with_lengths(options: DataOptions, context: int | None, whose: str = "the model") -> DataOptions:
    """``options`` with ``max_length`` fixed: as given; else DEFAULT_MAX_LENGTH, or the ``context`` (positions) of
    the model the data is for when that is shorter -- said once, since it truncates more than the default."""
    if options.max_length is not None:
        return options
    length = DEFAULT_MAX_LENGTH
    if context and context < DEFAULT_MAX_LENGTH:
        length = context
        if (context, whose) not in _said:
            _said.add((context, whose))
            log.info("max_length %d: %s takes %d positions, fewer than the default %d (pass --max-length to choose)",
                     length, whose, context, DEFAULT_MAX_LENGTH)
    return dataclasses.replace(options, max_length=length)
