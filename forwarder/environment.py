"""How the environment becomes :class:`~forwarder.config.Settings`: ``load_settings``.

It reads ``FORWARDER_*`` variables (and ``./.env``), refuses unknown ``FORWARDER_*`` names (naming
the closest setting), ignores the variables Kubernetes injects for Services whose name maps to the
prefix (service links), reads secrets from ``<NAME>_FILE``, and turns validation errors into one
line per variable, never echoing a value. ``describe_variables`` writes ``--help`` and the
README's table from the settings' docstrings.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path

from forwarder.config import ENV_PREFIX, Settings, env_name, setting_docs, setting_fields
from forwarder.errors import ConfigError

__all__ = ["env_name", "load_settings"]

FILE_SUFFIX = "_FILE"


def secret_variables() -> dict[str, tuple[str, ...]]:
    """Each secret setting (every ``SecretStr`` field, alone or in a list) and the variables that
    set it, first the preferred one: each may instead be read from ``<variable>_FILE``."""
    return {name: field.variables for name, field in setting_fields().items() if field.secret}


@functools.cache
def known_variables() -> frozenset[str]:
    """Every ``FORWARDER_*`` variable the forwarder reads (``<secret>_FILE`` included)."""
    names = {env_name(field) for field in setting_fields()}
    for variables in secret_variables().values():
        names |= {*variables, *(variable + FILE_SUFFIX for variable in variables)}
    return frozenset(name for name in names if name.startswith(ENV_PREFIX))


def _dotenv_values(path: Path = Path(".env")) -> dict[str, str]:
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        name, _, value = line.strip().removeprefix("export ").partition("=")
        name = name.strip()
        if name and not name.startswith("#"):
            values[name] = value.strip().strip("'\"")
    return values


#: What Kubernetes injects into every pod for each Service in its namespace (docker-link style
#: variables), when the Service's name maps onto our prefix: a Service ``forwarder`` gives
#: ``FORWARDER_SERVICE_HOST``, ``FORWARDER_PORT``, ``FORWARDER_PORT_8080_TCP_ADDR``...; one named
#: ``forwarder-metrics`` gives ``FORWARDER_METRICS_SERVICE_HOST`` and so on.  Each suffix has a
#: fixed value shape, which is checked too: a misspelt setting (``FORWARDER_HTTPS_PORT=8080``)
#: has the name but not the value of a link (``tcp://10.0.0.1:8080``), and is still refused.
_IP = r"(?:[0-9.]+|[0-9A-Fa-f:]+)"
_LINK = rf"(?:tcp|udp|sctp)://(?:{_IP}|\[{_IP}\]):\d+"
_SERVICE_LINKS = (
    (re.compile(r"_SERVICE_HOST\Z"), re.compile(rf"{_IP}\Z")),
    (re.compile(r"_SERVICE_PORT(?:_[A-Z0-9_]+)?\Z"), re.compile(r"\d+\Z")),
    (re.compile(r"_PORT\Z"), re.compile(rf"{_LINK}\Z")),
    (re.compile(r"_PORT_\d+_(?:TCP|UDP|SCTP)\Z"), re.compile(rf"{_LINK}\Z")),
    (re.compile(r"_PORT_\d+_(?:TCP|UDP|SCTP)_PROTO\Z"), re.compile(r"(?:tcp|udp|sctp)\Z")),
    (re.compile(r"_PORT_\d+_(?:TCP|UDP|SCTP)_PORT\Z"), re.compile(r"\d+\Z")),
    (re.compile(r"_PORT_\d+_(?:TCP|UDP|SCTP)_ADDR\Z"), re.compile(rf"{_IP}\Z")),
)


def is_service_link(name: str, value: str) -> bool:
    """True when ``name=value`` is a variable Kubernetes injected for a Service, not a setting."""
    return any(
        suffix.search(name) is not None and shape.match(value) is not None
        for suffix, shape in _SERVICE_LINKS
    )


def _not_settings(environ: Mapping[str, str]) -> dict[str, bool]:
    """Each ``FORWARDER_*`` variable in ``environ`` that is no setting, and whether it is a
    Kubernetes service link."""
    known = known_variables()
    return {
        name: is_service_link(name.upper(), value)
        for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in known
    }


def service_links(environ: Mapping[str, str]) -> list[str]:
    """The ``FORWARDER_*`` variables in ``environ`` that are Kubernetes service links, ignored."""
    return sorted(name for name, link in _not_settings(environ).items() if link)


def check_unknown_variables(environ: Mapping[str, str]) -> None:
    """Refuse ``FORWARDER_*`` names that are no setting (a typo would silently keep a default);
    Kubernetes service links (:func:`is_service_link`) are not settings and pass."""
    unknown = [name for name, link in _not_settings(environ).items() if not link]
    if unknown:
        known = known_variables()
        problems = []
        for name in sorted(unknown):
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append(f"{name}: unknown variable{hint}")
        raise ConfigError("; ".join(problems))


def _check_links_on_settings(environ: Mapping[str, str]) -> None:
    """A Service named, say, ``forwarder-http`` makes Kubernetes inject ``FORWARDER_HTTP_PORT=
    tcp://...``, which lands on a real setting: say so, rather than "not a valid integer"."""
    for name in sorted(known_variables() & {n.upper() for n in environ}):
        value = next(v for n, v in environ.items() if n.upper() == name)
        if is_service_link(name, value):
            service = name.removesuffix("_PORT").lower().replace("_", "-")
            raise ConfigError(
                f"{name}: holds a Kubernetes service link ({value.split(':')[0]}://...), not a "
                f"setting: a Service named {service!r} shares the variable's name; set "
                "enableServiceLinks: false in the pod spec (the chart does)"
            )


def _read_secret_file(variable: str, path: str) -> str:
    """A secret file's text without one trailing newline (``echo key > file`` writes one); an
    error names the variable and the path, never the content."""
    try:
        with open(path, encoding="utf-8", newline="") as file:  # keep \r: one newline only
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{variable}: cannot read {path} ({type(exc).__name__})") from None
    return text.removesuffix("\n").removesuffix("\r")


def secrets_from_files(environ: Mapping[str, str]) -> dict[str, str]:
    """The secret settings named by ``<variable>_FILE`` in ``environ``, read, by field name.

    Vault Agent, the Secrets Store CSI driver and Docker secrets write files, not variables.
    Setting a secret both ways (or through two ``_FILE`` names) is refused: which one wins would
    be a guess.  An empty variable counts as unset (compose's ``${KEY:-}`` writes one)."""
    upper = {name.upper(): value for name, value in environ.items()}
    values = {}
    for field, variables in secret_variables().items():
        files = [v + FILE_SUFFIX for v in variables if upper.get(v + FILE_SUFFIX)]
        if not files:
            continue
        direct = [v for v in variables if upper.get(v)]
        if direct or len(files) > 1:
            raise ConfigError(f"{' and '.join([*direct, *files])} are both set: set only one")
        values[field] = _read_secret_file(files[0], upper[files[0]])
    return values


def load_settings(**overrides: object) -> Settings:
    """Build :class:`Settings` from the environment (and ``./.env``; the environment wins),
    variable names in any case; ``overrides`` win over both.  Unknown ``FORWARDER_*`` variables
    are refused, naming the closest; secrets may come from files (:func:`secrets_from_files`);
    every bad value is one ``<VARIABLE>: <problem>`` part of the :class:`ConfigError`.

    Kubernetes service-link variables are ignored (:func:`service_links` names them)."""
    environ = {**_dotenv_values(), **os.environ}
    check_unknown_variables(environ)
    _check_links_on_settings(environ)
    upper = {name.upper(): value for name, value in environ.items()}
    values: dict[str, object] = {}
    for name, field in setting_fields().items():
        variable = next((v for v in field.variables if v in upper), None)
        if variable is not None:
            values[name] = upper[variable]
    values |= secrets_from_files(environ) | overrides
    return Settings(**values)  # type: ignore[arg-type]


def describe_variables() -> list[tuple[str, str, str]]:
    """``(variable, default, description)`` for every setting: for ``--help`` and the README."""
    rows = []
    docs = setting_docs()
    for name, field in setting_fields().items():
        variable = env_name(name)
        if name == "datagrid_api_key":
            variable = "DATAGRID_API_KEY / FORWARDER_DATAGRID_API_KEY"
        default = field.default
        if isinstance(default, list) or default is None:
            shown = ""
        elif isinstance(default, bool):
            shown = str(default).lower()
        else:
            shown = str(getattr(default, "value", default))
        description = docs.get(name, "")
        if field.secret:  # generic, so a secret added later says it too
            description += f" Or read from `{field.variables[-1]}_FILE` (a file's path)."
        rows.append((variable, shown, description))
    return rows
