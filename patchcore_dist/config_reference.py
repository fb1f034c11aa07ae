"""The configuration reference, generated from the schema (:mod:`patchcore_dist.config`): every key with its
type, default, the commands that use it and its description. ``docs/configuration.md`` is its output::

    python -m patchcore_dist.config_reference > docs/configuration.md

(a test fails while the committed file differs). The CLI's ``--help`` epilogs use the same helpers."""
from __future__ import annotations

import re
import sys
import types
import typing
from typing import Any, Literal

from annotated_types import Ge, Gt, Le, Lt

from .config import COMMAND_KEYS, MODEL_FIXED, Config, commands_using, load_config, schema_keys

REGENERATE = "python -m patchcore_dist.config_reference > docs/configuration.md"
_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string"}
_BOUNDS = ((Gt, "gt", ">"), (Ge, "ge", ">="), (Lt, "lt", "<"), (Le, "le", "<="))


def format_value(v: Any) -> str:
    """A value as it is written in YAML and in ``key=value`` overrides."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    return str(v)


def type_name(annotation: Any) -> str:
    """``integer``, ``number``, ``one of a, b``, ``list of strings``, ``... or null``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"list of {type_name(args[0])}s"
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def bounds(field) -> str:
    """The field's numeric bounds, e.g. ``> 0, <= 4096``."""
    out = []
    for meta in field.metadata:
        out += [f"{sign} {format_value(getattr(meta, attr))}" for kind, attr, sign in _BOUNDS if isinstance(meta, kind)]
    return ", ".join(out)


def first_clause(text: str, width: int = 64) -> str:
    """The description's first clause (up to a ``;`` or ``. `` outside parentheses), its parentheses dropped
    when it is longer than ``width``, shortened at a word if it still is."""
    depth, clause, plain = 0, text, ""
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0 and (ch == ";" or text.startswith(". ", i)):
            clause = text[:i]
            break
        elif depth == 0:
            plain += ch
    if len(clause) > width:
        clause = " ".join(plain.replace(" ,", ",").split()) if len(plain) < len(clause) else clause
    return clause if len(clause) <= width else clause[:width - 4].rsplit(" ", 1)[0] + " ..."


def defaults() -> dict[str, Any]:
    """Every dotted key's value in the packaged default config (configs/default.yaml over the schema)."""
    d = load_config().to_dict()
    return {k: d[k.split(".")[0]][k.split(".")[1]] if "." in k else d[k] for k in schema_keys()}


def _linked(text: str) -> str:
    """``docs/x.md#part`` in a description as a link between the docs pages."""
    return re.sub(r"docs/([\w-]+\.md(?:#[\w-]+)?)", r"[\1](\1)", text)


def _default_cell(key: str, field, value: Any) -> str:
    schema = None if field.is_required() else field.get_default(call_default_factory=True)
    cell = f"`{format_value(value)}`"
    return cell if schema == value else f"{cell} (packaged config; schema: `{format_value(schema)}`)"


def _used_by(key: str) -> str:
    users = commands_using(key)
    if not any(key == e or key.startswith(e + ".") for e in MODEL_FIXED):
        return ", ".join(users)
    return ", ".join(u for u in users if u not in ("score", "evaluate")) + "; score, evaluate: must equal the model's"


def _section_rows(section: str, keys: dict, values: dict) -> list[str]:
    rows = ["| key | type | default | used by | description |", "|---|---|---|---|---|"]
    for key, field in keys.items():
        if key.split(".")[0] == section:
            kind = type_name(field.annotation) + (f" ({bounds(field)})" if bounds(field) else "")
            rows.append(f"| `{key}` | {kind} | {_default_cell(key, field, values[key])} | {_used_by(key)} | "
                        f"{_linked(field.description)} |")
    return rows


INTRO = """# Configuration reference

<!-- Generated from the schema (patchcore_dist/config.py): do not edit by hand. Regenerate with
     {regenerate} -->

Every job takes `--config FILE` (default: the packaged `configs/default.yaml`) and `key=value`
overrides of dotted keys (values are YAML: `coreset.ratio=0.01`, `backbone.layers=[layer2, layer3]`,
`coreset.size=null`). A `backbone.name=...` override without `backbone.layers` drops the config
file's levels for the new backbone's own (logged).

- Unknown keys, wrong types and impossible values (ratio 0, crop > resize, even patch size, ...) are
  one clear error before any work starts; an unknown key names the closest one (`coreset.ratoi:
  unknown key; did you mean coreset.ratio?`). Integers are strict (`true`, `2.5` or `"8"` for an
  integer key is an error, not 1, 2 or 8); no number may be a boolean, infinite or NaN.
- Settings whose work or memory grows with them have upper bounds far above any useful value (the
  type column): `seed` at most 2^30 (faiss takes 32-bit seeds; the two-round coreset seeds part j
  with seed + j), `coreset.size` 20,000,000 rows (80 GB of float32 at D = 1024, larger than any
  realistic bank; see the capacity plan in [operations.md](operations.md#capacity-plan)), batch
  sizes 4096. Across sections: `image.crop` at most `image.resize` (a multiple of 8 with tiling),
  `scoring.sigma` at most `image.crop`, `index.pq_m` must divide `embedding.target_dim`;
  `runtime.actor_cpus` above `runtime.ray_num_cpus` is refused at load, above the cluster's CPUs when
  the actor pool is made (before the first image is read).
- A key that a command does not use is a warning, e.g. `coreset.ratio is a fit setting; score uses
  the model's (ignored here)`. At score time (and in evaluate) the model's features (backbone, image
  geometry, embedding, tiling) are fixed: a different value is refused as an incompatible config;
  scoring, the index's search parameters, runtime, output, storage and the decoding limits may change;
  every other fit setting is the model's.
- The model's identity (its digest, written into every score row) covers only what defines the model:
  backbone, image, embedding, coreset, scoring, index, fit, tiling and seed. `runtime.*`, `output.*`
  and `storage.*` never enter it: a fit with `runtime.gpu_batch_size=128` has the digest of one without.
"""


def _commands_table() -> list[str]:
    rows = ["## Which command uses which keys", "", "| command | sections and keys |", "|---|---|"]
    for command, entries in COMMAND_KEYS.items():
        rows.append(f"| `{command}` | " + ", ".join(f"`{e}`" for e in entries) + " |")
    return rows + ["", "`score` and `evaluate` also accept the model's feature keys (" +
                   ", ".join(f"`{e}`" for e in MODEL_FIXED) + ") with the model's values only."]


def render_markdown() -> str:
    """docs/configuration.md."""
    keys, values = schema_keys(), defaults()
    out = [INTRO.format(regenerate=REGENERATE)] + _commands_table()
    for section, field in Config.model_fields.items():
        doc = field.annotation.__doc__ if "." in next(k for k in keys if k.split(".")[0] == section) else None
        out += ["", f"## {section}", ""] + ([_linked(" ".join(doc.split())), ""] if doc else [])
        out += _section_rows(section, keys, values)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
