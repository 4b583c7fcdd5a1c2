"""Compose and validate the command line's configs before Hydra runs (or launches a sweep of) jobs.

Hydra reports a bad override as a multi-line message, and a bad value only surfaces inside each job,
after the workload is generated. Composing up front turns both into one line naming the key, and
checks every value of every swept key, so a sweep fails before its first job starts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from experiments.config import CONF_DIR, ConfigError, validate

_MULTIRUN_FLAGS = {"-m", "--multirun"}


def _one_line(e: Exception) -> str:
    """Hydra's message, its lines joined; the OmegaConf key/type dump lines add nothing for a user."""
    lines = [ln.strip() for ln in str(e).splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith(("full_key:", "object_type", "reference_type"))]
    return " ".join(keep)


def _missing_option(e: MissingConfigException) -> str:
    group = (e.missing_cfg_file or "").rpartition("/")[0]
    option = (e.missing_cfg_file or "").rpartition("/")[2]
    if group and e.options:
        return f"ConfigError: unknown {group} option {option!r} (known: {', '.join(sorted(e.options))})"
    return f"ConfigError: {_one_line(e)}"


def variants(args: list[str]) -> list[list[str]] | None:
    """Override lists that cover every value of every sweep (first values elsewhere); None: not ours.

    Hydra's own keys (hydra.*, hydra/…) are left to Hydra: they configure the launcher, not the run.
    """
    parsed = OverridesParser.create().parse_overrides(args)
    base: list[str] = []
    sweeps: list[tuple[int, str, list[str]]] = []
    for o in parsed:
        if o.key_or_group.startswith("hydra"):
            continue
        if o.is_sweep_override():
            try:
                values = list(o.sweep_string_iterator())
            except Exception:  # glob sweeps and the like: Hydra expands and checks them itself
                continue
            key = o.get_key_element()
            sweeps.append((len(base), key, values))
            base.append(f"{key}={values[0]}")
        else:
            base.append(o.input_line)
    out = [base]
    for i, key, values in sweeps:
        out += [[*base[:i], f"{key}={v}", *base[i + 1:]] for v in values[1:]]
    return out


def precheck(argv: list[str], conf_dir: Path = CONF_DIR, config_name: str = "config",
             check: Callable[[DictConfig], object] = validate,
             errors: tuple[type[Exception], ...] = (ConfigError,)) -> str | None:
    """The one-line error for argv, or None when `check` accepts every composed variant of
    `config_name`; `errors` are the exceptions of `check` that mean a config cannot work."""
    flags = [a for a in argv if a.startswith("-")]
    if any(f not in _MULTIRUN_FLAGS for f in flags):
        return None  # --help, --cfg, -cn …: Hydra's own business
    args = [a for a in argv if not a.startswith("-")]
    try:
        runs = variants(args)
    except HydraException as e:
        return f"ConfigError: {_one_line(e)}"
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            for overrides in runs or []:
                check(compose(config_name=config_name, overrides=overrides))
    except MissingConfigException as e:
        return _missing_option(e)
    except (HydraException, OmegaConfBaseException) as e:
        return f"ConfigError: {_one_line(e)}"
    except errors as e:
        return f"{type(e).__name__}: {e}"
    finally:
        GlobalHydra.instance().clear()
    return None


def exit_on(error: str | None) -> None:
    """A console script's answer to a pre-check: the one line on stderr and exit status 2."""
    if error:
        print(error, file=sys.stderr)
        sys.exit(2)
