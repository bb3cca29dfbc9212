"""Prompt templates of text-to-text tasks: one ``{input}``, doubled braces as literal text (as ``str.format``), the
parts before and after the input, and where an output joins its prompt. One owner for the datamodule and the task
collections' readers."""

from __future__ import annotations

import functools
import re

INPUT_FIELD = "{input}"


#: A template's special pieces, read left to right as ``str.format`` does: ``{{`` and ``}}`` (a literal brace)
#: and ``{name}`` (a placeholder: only ``{input}`` is one). Other braces, as in ``{"a": 1}``, are text.
_TEMPLATE_PIECE = re.compile(r"\{\{|\}\}|\{[A-Za-z_]\w*\}")


def check_template(template: str, where: str = "template") -> str:
    """``template`` itself, or an error when it lacks exactly one ``{input}`` or names another placeholder."""
    pieces = [piece for piece in _TEMPLATE_PIECE.findall(template) if piece not in ("{{", "}}")]
    if pieces.count(INPUT_FIELD) != 1:
        raise ValueError(
            f"The prompt template {template!r} ({where}) must contain {INPUT_FIELD} exactly once, where the input "
            'goes; e.g. "Input: {input}\\nOutput:" (write {{input}} for the text itself).'
        )
    unknown = sorted(set(pieces) - {INPUT_FIELD})
    if unknown:
        raise ValueError(
            f"The prompt template {template!r} ({where}) has the placeholder(s) {', '.join(unknown)}: only "
            f"{INPUT_FIELD} is filled in, and the output always follows the prompt after a space. End the template "
            'where the output starts, e.g. "Q: {input}\\nA:"; for braces as text, double them ({{word}}).'
        )
    return template


def literal_template_text(text: str) -> str:
    """``text`` as template text that reads as itself: its braces doubled, as ``str.format`` escapes them (a task
    collection's ``{word}`` is then text, never a placeholder)."""
    return text.replace("{", "{{").replace("}", "}}")


@functools.lru_cache(maxsize=4096)  # a task's rows share one template
def template_parts(template: str) -> tuple[str, str]:
    """The text before and after the ``{input}`` of a checked ``template``, with ``{{`` and ``}}`` read as braces."""
    prefix: list[str] = []
    suffix: list[str] = []
    text, position = prefix, 0
    for match in _TEMPLATE_PIECE.finditer(template):
        piece = match.group()
        text.append(template[position : match.start()])
        if piece == INPUT_FIELD:
            text = suffix
        else:
            text.append(piece[0] if piece in ("{{", "}}") else piece)
        position = match.end()
    text.append(template[position:])
    return "".join(prefix), "".join(suffix)


def output_joint(prompt: str) -> tuple[str, str]:
    """``prompt`` as written before an output, and the text between them: one space, but none after a prompt that
    ends in whitespace (as BIG-bench writes an output right after its output prefix, ``"\nA: "``). A trailing space
    is written with the output instead (``"A:"``, ``" yes"``: the same text, and the output's first token carries
    its space, as tokenizers split words)."""
    if prompt.endswith(" "):
        return prompt[:-1], " "
    return prompt, "" if prompt[-1:].isspace() else " "


def written_template_parts(template: str) -> tuple[str, str]:
    """:func:`template_parts` with the suffix as :func:`output_joint` writes it (a trailing space moves to the
    output), for a template whose prompts end with its suffix."""
    prefix, suffix = template_parts(template)
    return prefix, suffix[:-1] if suffix.endswith(" ") else suffix
