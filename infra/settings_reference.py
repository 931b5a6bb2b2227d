"""The settings reference (``docs/settings.md``), generated from ``infra.settings.Settings``.

One row per field: its environment variable, type, default and description. The description is
the field's ``#:`` comment in ``infra/settings.py`` (the lines right above it), so the code is
the one place a setting is documented; a field without one is an error here, and the test that
compares ``docs/settings.md`` with ``reference()`` fails until it has one. Regenerate with::

    python -m infra.settings_reference > docs/settings.md
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from dataclasses import dataclass, fields
from typing import Final

from infra import settings as settings_module
from infra.settings import Settings

#: What regenerates the file; the staleness test prints it.
COMMAND: Final = "python -m infra.settings_reference > docs/settings.md"


@dataclass(frozen=True, slots=True)
class SettingDoc:
    """One setting as the reference shows it."""

    field: str
    env: str  # METER_<FIELD>, the name Settings.from_env reads
    type: str  # the annotation as written (str, int, float, Path)
    default: str  # as an environment variable would spell it; "" for an empty string
    description: str  # the field's ``#:`` comment, in Markdown


def env_name(field: str) -> str:
    """The environment variable of a field, as ``Settings.from_env`` reads it."""
    return f"METER_{field.upper()}"


def _markdown(rst: str) -> str:
    """The comments' reStructuredText literals (````x````) as Markdown code (```x```); a
    literal that names another field is shown as its environment variable, the name an
    operator sets."""
    names = {f.name for f in fields(Settings)}

    def code(m: re.Match[str]) -> str:
        text = m[1]
        return f"`{env_name(text) if text in names else text}`"

    return re.sub(r"``(.+?)``", code, rst)


def _comments() -> dict[str, str]:
    """field -> the ``#:`` lines right above it in the ``Settings`` class body, joined."""
    source = inspect.getsource(settings_module)
    lines = source.splitlines()
    [cls] = [
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.ClassDef) and n.name == Settings.__name__
    ]
    found: dict[str, str] = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        i = node.lineno - 2  # the line above the field, 0-based
        while i >= 0 and lines[i].strip().startswith("#:"):
            above.insert(0, lines[i].strip().removeprefix("#:").strip())
            i -= 1
        found[node.target.id] = " ".join(above)
    return found


def setting_docs() -> list[SettingDoc]:
    """Every field of ``Settings``, in declaration order.

    Raises ``ValueError`` naming the fields that have no ``#:`` comment."""
    comments = _comments()
    defaults = Settings()
    missing = [f.name for f in fields(Settings) if not comments.get(f.name)]
    if missing:
        raise ValueError(
            f"settings without a #: comment in infra/settings.py: {', '.join(missing)}"
        )
    return [
        SettingDoc(
            field=f.name,
            env=env_name(f.name),
            type=str(f.type),
            default=str(getattr(defaults, f.name)),
            description=_markdown(comments[f.name]),
        )
        for f in fields(Settings)
    ]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    """``docs/settings.md`` as it should read: a short preface and one table."""
    rows = [
        "| variable | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for d in setting_docs():
        default = f"`{d.default}`" if d.default else "empty"
        rows.append(f"| `{d.env}` | {d.type} | {_cell(default)} | {_cell(d.description)} |")
    preface = f"""# Settings

Generated from the fields of `infra.settings.Settings` and their `#:` comments; do not edit
this page: edit those, then run `{COMMAND}`
(a test fails while this page is stale).

Every setting is an environment variable `METER_<FIELD>`, read once, at start, by
`Settings.from_env` (`infra/settings.py`); nothing else in the project reads the environment.
An unknown `METER_*` variable is an error, so a typo never silently falls back to a default,
and a value the service cannot use (a port out of range, a zero batch size, an unknown gateway)
stops it at start with the variable's name (`Settings.validate`). Numbers are written as the
environment spells them: `5` and `5.0` are the same float.

Where `METER_KAFKA_BOOTSTRAP`, `METER_REDIS_URL` or `METER_DATABASE_URL` is empty, the process
starts an embedded broker, `redis-server` or PostgreSQL of its own under `METER_DATA_DIR`
(demo, tests); `meter run ops` and `meter run recharge` need all three set.
"""
    return preface + "\n" + "\n".join(rows) + "\n"


#: Where the reference lives, relative to the project root.
DOCS_PATH: Final = "docs/settings.md"


def main() -> int:
    sys.stdout.write(reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
