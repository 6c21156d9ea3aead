"""docs/config.md, generated from the config dataclasses (their defaults and end-of-line comments):
`python -m teleflm.train.config_reference > docs/config.md`. A test fails when the file is stale."""

import dataclasses
import inspect
import io
import tokenize
import typing

from teleflm.train.config import MODEL_RANGES, TrainConfig, model_fields


def field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` -> {name: comment}, for cls and its dataclass bases."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = inspect.getsource(klass)
        current = None
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME and tok.start[1] == 4 and current is None:
                current = tok.string
            elif tok.type == tokenize.COMMENT and current:
                comments[current] = tok.string.lstrip("# ").strip()
            elif tok.type == tokenize.NEWLINE:
                current = None
    return comments


def type_name(hint) -> str:
    if typing.get_origin(hint) is list:
        return f"list of {type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is dict or hint is dict:
        return "table"
    return getattr(hint, "__name__", str(hint))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{f.default!r}`".replace("'", '"')
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else f"`{value!r}`"
    return "required"


HEADER = ["| key | type | default | range | meaning |", "|---|---|---|---|---|"]


def section_table(cls) -> str:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    ranges = getattr(cls, "RANGES", {})
    rows = list(HEADER)
    for f in dataclasses.fields(cls):
        rows.append(
            f"| `{f.name}` | {type_name(hints[f.name])} | {default_text(f)} | {ranges.get(f.name, '')} | "
            f"{comments.get(f.name, '')} |"
        )
    doc = inspect.getdoc(cls) or ""
    return (doc + "\n\n" if doc and not doc.startswith(cls.__name__ + "(") else "") + "\n".join(rows)


def model_table() -> str:
    """The [model] keys: TeleFLMConfig's fields, with its defaults."""
    from teleflm.model import TeleFLMConfig

    defaults = inspect.signature(TeleFLMConfig.__init__).parameters
    rows = [
        "The official Tele-FLM `config.json` fields (`TeleFLMConfig`, see docs/model.md); no other key.",
        "",
        "| key | type | default | range |",
        "|---|---|---|---|",
    ]
    for name, hint in model_fields().items():
        default = f"`{defaults[name].default!r}`".replace("'", '"')
        rows.append(f"| `{name}` | {type_name(hint)} | {default} | {MODEL_RANGES.get(name, '')} |")
    return "\n".join(rows)


def reference() -> str:
    hints = typing.get_type_hints(TrainConfig)
    parts = [
        "# Configuration reference",
        "",
        "Generated from `teleflm/train/config.py` by `python -m teleflm.train.config_reference`; do not edit.",
        "A pre-training config is a TOML file with these tables; `--set section.key=value` overrides any key.",
        "",
        "## Top level",
        "",
        *HEADER,
    ]
    comments = field_comments(TrainConfig)
    sections = []
    for f in dataclasses.fields(TrainConfig):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            sections.append((f.name, hint))
        elif f.name == "model":
            sections.append((f.name, None))
        else:
            parts.append(
                f"| `{f.name}` | {type_name(hint)} | {default_text(f)} | "
                f"{TrainConfig.RANGES.get(f.name, '')} | {comments.get(f.name, '')} |"
            )
    for name, cls in sections:
        parts += ["", f"## [{name}]", ""]
        if cls is None:
            parts.append(model_table())
        else:
            parts.append(section_table(cls))
            for sub in dataclasses.fields(cls):
                item = typing.get_args(typing.get_type_hints(cls)[sub.name])
                if item and dataclasses.is_dataclass(item[0]):
                    parts += ["", f"### [[{name}.{sub.name}]]", "", section_table(item[0])]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
