"""Sweep configs: an experiment plus a ``sweep:`` section declaring what varies and how.

A sweep file is an experiment config (or ``base: path/to/experiment.yaml`` plus sections that
override it) with a ``sweep:`` section::

    base: sar-buildings.yaml           # relative to this file
    name: sar-buildings-lr             # the sweep's name (default: the file name)
    train: {epochs: 8}                 # fixed settings, as in any experiment config
    sweep:
      search: optuna                   # optuna (TPE) | random | grid
      num_samples: 12                  # configurations drawn (grid: every point once)
      seeds: [0, 1, 2]                 # each configuration once per seed
      scheduler: asha                  # fifo | asha (early stopping on the metric per epoch)
      parameters:
        train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
        model.decoder_channels:
          type: choice
          values: {narrow: [32, 16, 8], wide: [64, 32, 16]}
        method_settings.dice_weight: {type: uniform, low: 0.0, high: 2.0,
                                      when: {method_settings.input: sar}}

Every swept key is a dotted config key; the whole sweep is validated here, without Ray, before
anything starts: unknown keys, keys that are not config keys, and sampled configurations that do
not build are refused with a :class:`~xmodal.errors.ConfigError` naming the key.

A config with ``phases`` is a chain sweep: every trial runs the whole chain (e.g. pretrain ->
finetune). ``phases.<name>.<key>`` sweeps a key of one phase, applied after that phase's own
overrides (``phases.finetune.train.lr``, ``phases.finetune.data.labels.fraction``); keys without the
prefix change the base every phase inherits. ``phases.<name>`` alone, a ``choice`` whose values
are mappings of the phase's own fields (``overrides``, ``inputs``), swaps whole variants of a
phase: each given field replaces the phase's (e.g. the arms of a comparison: transfer method,
finetuning baseline, training from scratch, one named series each). ``seeds`` repeat whole chains. Trials are ranked by the
last phase's metric; a phase whose configuration (and inputs) several trials share, such as a
pretraining that only the finetuning values differ after, runs once and is reused.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xmodal.engine.config import ExperimentConfig, _TOP_LEVEL, build_config, parse_overrides, phase_configs, read_yaml
from xmodal.engine.storage import refuse_job_scratch
from xmodal.errors import ConfigError
from xmodal.settings import from_dict, get_dotted, merge, set_dotted, to_dict

# Files of a sweep folder (written by xmodal.tune.sweep, read by xmodal.report.sweeps).
SPEC_FILE = "sweep.json"
RUN_FILE = "sweep_run.json"
RERUN_DIR = "rerun-best"  # the stage after the search (sweep.rerun_best): its Tune experiment
RERUN_FILE = "rerun_best.json"  # and its mean +- std over seeds
FINAL_KEY = "sweep/final"  # marks a trial's last row: its test metrics after training
PARAMETER_TYPES = ("uniform", "loguniform", "int", "choice")
SEARCHES = ("optuna", "random", "grid")
SCHEDULERS = ("fifo", "asha")
ENGINES = ("train", "plain")
# Reports a sweep asks for beside the generic one (xmodal.report): ``zoo``, the pretext zoo's.
REPORTS = ("zoo",)
# Keys of a trial's Tune config that are bookkeeping, not swept parameters.
GRID_POINT_KEY = "point"
SEED_KEY = "seed"
REPEAT_INDEX_KEY = "__trial_index__"
# Configurations built while validating an Optuna/random sweep (random draws of the space).
VALIDATION_DRAWS = 32


STUDY_PASSWORD_ENV = "XMODAL_STUDY_PASSWORD"
# Passwords given inside sweep.study_storage URLs, by the URL without them: held by this process
# only, so nothing the sweep writes, prints or pickles carries them.
_STUDY_PASSWORDS: dict[str, str] = {}


def _split_password(url: str) -> tuple[str, str | None]:
    """A database URL without its password, and the password (``None`` when it has none)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:  # not a URL SQLAlchemy reads (Optuna will say so): drop user:password@ anyway
        match = re.match(r"^([^:/]+://[^:/@]*):([^@/]*)@(.*)$", url)
        return (f"{match[1]}@{match[3]}", match[2]) if match else (url, None)
    if parsed.password is None:
        return url, None
    return _with_password(parsed, None), str(parsed.password)


def _with_password(parsed: Any, password: str | None) -> str:
    """A parsed SQLAlchemy URL written out with ``password`` (``None``: without one)."""
    from sqlalchemy.engine import URL

    return URL.create(
        parsed.drivername, username=parsed.username, password=password, host=parsed.host, port=parsed.port,
        database=parsed.database, query=parsed.query,
    ).render_as_string(hide_password=False)


def without_password(url: str) -> str:
    """A database URL as it may be written or printed: without its password."""
    return _split_password(url)[0]


def remember_study_password(url: str) -> str:
    """Keep a study URL's password in this process only; returns the URL without it."""
    bare, password = _split_password(url)
    if password is not None:
        _STUDY_PASSWORDS[bare] = password
    return bare


def study_url_to_connect(url: str) -> str:
    """The study URL with its password: the one given in the URL to this process, else
    ``$XMODAL_STUDY_PASSWORD``, else none (SQLite, or Postgres reading ``$PGPASSWORD`` itself)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    bare, given = _split_password(url)
    password = given or _STUDY_PASSWORDS.get(bare) or os.environ.get(STUDY_PASSWORD_ENV)
    try:
        parsed = make_url(bare) if password else None
    except ArgumentError:  # Optuna names the URL it cannot read
        return url
    if parsed is None or parsed.username is None:
        return url
    return _with_password(parsed, password)


@dataclass
class AshaSettings:
    """ASHA early stopping (``sweep.asha``).

    Attributes:
        grace_period: Epochs every trial runs before it can be stopped.
        reduction_factor: Share of trials kept at each rung is 1 / reduction_factor.
    """

    grace_period: int = 1
    reduction_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise ConfigError(f"sweep.asha.grace_period={self.grace_period}; expected >= 1")
        if self.reduction_factor <= 1:
            raise ConfigError(f"sweep.asha.reduction_factor={self.reduction_factor}; expected > 1")


@dataclass
class RerunBestSettings:
    """The stage after the search (``sweep.rerun_best``): the best configuration trained again with
    new seeds, so its score comes with a spread (mean +- std) rather than one lucky draw.

    Attributes:
        seeds: How many runs (0: no such stage); their seeds follow the largest seed the search
            used (``sweep.seeds``, else the config's ``train.seed``), set on every ``sweep.seed_keys``.
    """

    seeds: int = 0

    def __post_init__(self) -> None:
        if self.seeds < 0:
            raise ConfigError(f"sweep.rerun_best.seeds={self.seeds!r}; expected a number of runs (0: none)")


@dataclass
class SweepSettings:
    """The ``sweep:`` section (everything but ``parameters``).

    Attributes:
        search: ``optuna`` (TPE, define-by-run), ``random`` (Optuna's random sampler) or
            ``grid`` (every combination of the ``choice`` parameters).
        num_samples: Configurations drawn by optuna/random (ignored by grid).
        metric: Metric ranking trials (default: the selection metric of the (last phase's)
            method, e.g. ``val/iou``).
        mode: ``max`` or ``min`` (default: that metric's).
        seeds: Run every configuration once per seed (``None``: once, with the config's seed).
        seed_keys: Config keys set to the seed (e.g. also ``data.label_seed``).
        scheduler: ``fifo`` (every trial runs to the end) or ``asha`` (early stopping).
        asha: ASHA settings.
        max_concurrent_trials: ``auto`` (from the resources a trial needs and the cluster's)
            or a number.
        trial_cpus: CPUs of each trial's driver actor (the Tune trial itself).
        max_failures: Reruns of a trial whose own process, node or Train controller died (it
            resumes from its last checkpoint). A lost Train worker is retried inside its run, up
            to ``run.max_failures``; a run that failed after those is not rerun here, so the two
            budgets do not multiply.
        storage: Folder or URI (``s3://``, ``gs://``, shared mount) holding sweep folders.
        results: Local folder for per-trial run.json and TensorBoard (default: inside the
            sweep folder when it is local, else ``results/sweeps/<name>``).
        study_storage: Optuna RDB URL (default: SQLite file in a local sweep folder; on remote
            storage, a database URL such as ``postgresql://user@host/db``, or none: Tune's own
            searcher checkpoint still makes the sweep resumable). Give the password in
            ``$XMODAL_STUDY_PASSWORD`` (for Postgres, libpq's own ``$PGPASSWORD`` works too);
            one written in the URL is used to connect but kept out of ``sweep.json``, the console
            and Tune's pickled state (a resume needs it given again).
        sampler_seed: Seed of the Optuna sampler.
        local_cpus: Logical CPUs of a local Ray started by the sweep (``None``: enough for one trial).
        engine: How a trial trains: ``train`` (each run a Ray Train worker group, the default) or
            ``plain`` (each run inside the trial's own actor with torch loaders, the plain engine:
            no worker group to start, so small runs on one worker cost seconds less each; one
            worker per run and local storage only).
        report: A report beside the generic one: ``zoo`` (arms of a whole-phase choice against
            the last phase's task, label share and frozen / finetuned encoder; see :func:`zoo_keys`).
        rerun_best: After the search, train the best configuration again with
            ``{seeds: N}`` new seeds (:class:`RerunBestSettings`; default none).
    """

    search: str = "optuna"
    num_samples: int = 8
    metric: str | None = None
    mode: str | None = None
    seeds: list[int] | None = None
    seed_keys: list[str] = field(default_factory=lambda: ["train.seed"])
    scheduler: str = "fifo"
    asha: AshaSettings = field(default_factory=AshaSettings)
    max_concurrent_trials: int | str = "auto"
    trial_cpus: float = 1.0
    max_failures: int = 2
    storage: str = "runs/sweeps"
    results: str | None = None
    study_storage: str | None = None
    sampler_seed: int = 0
    local_cpus: int | None = None
    engine: str = "train"
    report: str | None = None
    rerun_best: RerunBestSettings = field(default_factory=RerunBestSettings)

    def __post_init__(self) -> None:
        if self.report is not None and self.report not in REPORTS:
            raise ConfigError(f"sweep.report={self.report!r}; expected one of {list(REPORTS)} (or none)")
        if self.engine not in ENGINES:
            raise ConfigError(f"sweep.engine={self.engine!r}; expected one of {list(ENGINES)}")
        if self.search not in SEARCHES:
            raise ConfigError(f"sweep.search={self.search!r}; expected one of {list(SEARCHES)}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"sweep.scheduler={self.scheduler!r}; expected one of {list(SCHEDULERS)}")
        if self.mode is not None and self.mode not in ("min", "max"):
            raise ConfigError(f"sweep.mode={self.mode!r}; expected min or max")
        if self.num_samples < 1:
            raise ConfigError(f"sweep.num_samples={self.num_samples}; expected >= 1")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ConfigError(f"sweep.seeds={self.seeds}; expected a non-empty list of distinct integers")
        if isinstance(self.max_concurrent_trials, str) and self.max_concurrent_trials != "auto":
            raise ConfigError(f"sweep.max_concurrent_trials={self.max_concurrent_trials!r}; expected auto or a number")
        if isinstance(self.max_concurrent_trials, int) and self.max_concurrent_trials < 1:
            raise ConfigError(f"sweep.max_concurrent_trials={self.max_concurrent_trials}; expected >= 1")
        if self.max_failures < 0 or self.trial_cpus < 0:
            raise ConfigError("sweep.max_failures and sweep.trial_cpus must be >= 0")
        if self.study_storage:
            self.study_storage = remember_study_password(self.study_storage)


@dataclass
class Parameter:
    """One swept config key.

    Attributes:
        key: Dotted config key (``train.lr``).
        type: ``uniform``, ``loguniform``, ``int`` or ``choice``.
        low, high: Range of numeric types (inclusive).
        step: Grid step of ``uniform``/``int`` (``None``: continuous / 1).
        log: Log scale for ``int``.
        choices: ``choice`` options, name -> config value. Names are what Optuna, Tune,
            CSV files and figures show (layer subsets: ``l34`` rather than a list).
        when: Condition on earlier choice parameters: key -> allowed choice names; the
            parameter exists only in trials that satisfy it.
    """

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: dict[str, Any] = field(default_factory=dict)
    when: dict[str, list[Any]] = field(default_factory=dict)

    def active(self, chosen: dict[str, Any]) -> bool:
        """Whether this parameter exists given the choices made so far."""
        return all(chosen.get(key, _ABSENT) in allowed for key, allowed in self.when.items())

    def value(self, chosen: Any) -> Any:
        """The config value of a sampled value (choice names map to their values)."""
        if self.type == "choice":
            return copy.deepcopy(self.choices[chosen])
        return chosen

    def suggest(self, trial: Any) -> Any:
        """Sample through an Optuna trial (define-by-run)."""
        if self.type == "uniform":
            return trial.suggest_float(self.key, self.low, self.high, step=self.step)
        if self.type == "loguniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_categorical(self.key, list(self.choices))

    def draw(self, rng: random.Random) -> Any:
        """A random value (used to validate the space without Optuna)."""
        if self.type == "choice":
            return rng.choice(list(self.choices))
        if self.type == "int":
            return rng.randint(int(self.low), int(self.high))
        if self.type == "loguniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)

    def edges(self) -> list[Any]:
        """Values every configuration must accept: each choice, or both ends of a range."""
        if self.type == "choice":
            return list(self.choices)
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


_ABSENT = object()


def _number(value: Any, where: str) -> float:
    # PyYAML reads ``1e-4`` (no dot) as a string; accept any numeric spelling.
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None


def parse_parameter(key: str, raw: Any, earlier: dict[str, Parameter]) -> Parameter:
    """Validate one entry of ``sweep.parameters``.

    Args:
        key: The dotted config key.
        raw: A mapping with ``type`` (and ``low``/``high``/``values``/``when``...), or a
            list (shorthand for ``type: choice``).
        earlier: Parameters declared before this one (``when`` may only refer to those).
    """
    where = f"sweep.parameters.{key}"
    if isinstance(raw, list):
        raw = {"type": "choice", "values": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with 'type' (or a list of choices), got {raw!r}")
    raw = dict(raw)
    kind = raw.pop("type", None)
    if kind not in PARAMETER_TYPES:
        raise ConfigError(f"{where}.type={kind!r}; expected one of {list(PARAMETER_TYPES)}")
    allowed = {"uniform": {"low", "high", "step"}, "loguniform": {"low", "high"}, "int": {"low", "high", "step", "log"}, "choice": {"values"}}[kind]
    unknown = set(raw) - allowed - {"when"}
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)} for type {kind}; allowed: {sorted(allowed | {'when'})}")
    param = Parameter(key=key, type=kind)
    if kind == "choice":
        values = raw.get("values")
        if isinstance(values, dict):
            if not values:
                raise ConfigError(f"{where}.values: no choices")
            param.choices = {name: value for name, value in values.items()}
        elif isinstance(values, list) and values:
            for value in values:
                if value is not None and not isinstance(value, (str, int, float, bool)):
                    raise ConfigError(
                        f"{where}.values: {value!r} is not a plain value; name such choices with a mapping, "
                        f"e.g. values: {{l34: [layer3, layer4]}}"
                    )
            if len(set(map(repr, values))) != len(values):
                raise ConfigError(f"{where}.values: duplicate choices in {values}")
            param.choices = {value: value for value in values}
        else:
            raise ConfigError(f"{where}.values: expected a non-empty list or a mapping name -> value, got {values!r}")
    else:
        for bound in ("low", "high"):
            if bound not in raw:
                raise ConfigError(f"{where}: missing {bound!r} for type {kind}")
        param.low = _number(raw["low"], f"{where}.low")
        param.high = _number(raw["high"], f"{where}.high")
        if param.low >= param.high:
            raise ConfigError(f"{where}: low={param.low} must be below high={param.high}")
        if kind == "loguniform" and param.low <= 0:
            raise ConfigError(f"{where}: a loguniform range needs low > 0, got {param.low}")
        if "step" in raw and raw["step"] is not None:
            param.step = _number(raw["step"], f"{where}.step")
            if param.step <= 0:
                raise ConfigError(f"{where}.step={param.step}; expected > 0")
        if kind == "int":
            if param.low != int(param.low) or param.high != int(param.high):
                raise ConfigError(f"{where}: int bounds must be whole numbers, got {param.low}..{param.high}")
            param.log = bool(raw.get("log", False))
    when = raw.get("when") or {}
    if not isinstance(when, dict):
        raise ConfigError(f"{where}.when: expected a mapping key -> choice (or list of choices), got {when!r}")
    for other, allowed_values in when.items():
        parent = earlier.get(other)
        if parent is None or parent.type != "choice":
            raise ConfigError(f"{where}.when: {other!r} must be a choice parameter declared before {key!r}")
        values = allowed_values if isinstance(allowed_values, list) else [allowed_values]
        missing = [v for v in values if v not in parent.choices]
        if missing:
            raise ConfigError(f"{where}.when.{other}: {missing} not among its choices {list(parent.choices)}")
        param.when[other] = values
    return param


PHASE_PREFIX = "phases."


def split_phase_key(key: str) -> tuple[str | None, str]:
    """``phases.<name>.<rest>`` -> (name, rest); other keys -> (None, key)."""
    if not key.startswith(PHASE_PREFIX):
        return None, key
    name, _, rest = key[len(PHASE_PREFIX):].partition(".")
    return name, rest


def set_swept(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a swept value: on the base, or (``phases.<name>.<key>``) over that phase's own overrides.

    Raises:
        ConfigError: The phase does not exist.
    """
    phase, rest = split_phase_key(key)
    if phase is None:
        set_dotted(raw, key, value)
        return
    for entry in raw.get("phases") or []:
        if isinstance(entry, dict) and entry.get("name") == phase:
            if not rest:
                fields = {"overrides", "inputs"}
                if not isinstance(value, dict) or not set(value) <= fields:
                    raise ConfigError(f"sweep.parameters.{key}: a whole-phase value is a mapping of {sorted(fields)}, got {value!r}")
                entry.update(copy.deepcopy(value))
                return
            overrides = entry.setdefault("overrides", {})
            set_dotted(overrides, rest, value)
            return
    names = [entry.get("name") for entry in raw.get("phases") or [] if isinstance(entry, dict)]
    raise ConfigError(f"sweep.parameters.{key}: the config has no phase {phase!r}; phases: {names}")


def final_config(config: ExperimentConfig) -> ExperimentConfig:
    """The run that ranks a trial: the config itself, or the last phase of its chain."""
    from xmodal.engine.config import phase_config

    return phase_config(config, config.phases[-1]) if config.phases else config


@dataclass
class SweepSpec:
    """A validated sweep.

    Attributes:
        name: Sweep name (its folder under ``settings.storage``).
        experiment: The fixed experiment (plain sections, paths absolute, no ``name``).
        settings: The ``sweep:`` section.
        parameters: Swept parameters in declaration order.
        metric, mode: What ranks trials.
        source: The file it came from.
    """

    name: str
    experiment: dict[str, Any]
    settings: SweepSettings
    parameters: list[Parameter]
    metric: str
    mode: str
    source: str = "<dict>"

    @property
    def max_epochs(self) -> int:
        """The most epochs the (last phase of a) trial can run: ASHA's horizon."""
        return max(final_config(self.build_trial(params, seed, "epochs")).train.epochs for params, seed in validation_points(self))

    @property
    def seeds(self) -> list[int | None]:
        return list(self.settings.seeds) if self.settings.seeds else [None]

    def parameter(self, key: str) -> Parameter:
        for param in self.parameters:
            if param.key == key:
                return param
        raise KeyError(key)

    def suggest(self, trial: Any) -> None:
        """Optuna define-by-run space: conditional parameters exist only where ``when`` holds."""
        chosen: dict[str, Any] = {}
        for param in self.parameters:
            if param.active(chosen):
                chosen[param.key] = param.suggest(trial)

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the choice parameters, with inactive ones left out (deduplicated)."""
        points: list[dict[str, Any]] = [{}]
        for param in self.parameters:
            grown = []
            for point in points:
                if param.active(point):
                    grown.extend({**point, param.key: name} for name in param.choices)
                else:
                    grown.append(point)
            points = grown
        unique, seen = [], set()
        for point in points:
            marker = repr(sorted(point.items(), key=lambda kv: kv[0]))
            if marker not in seen:
                seen.add(marker)
                unique.append(point)
        return unique

    def trial_params(self, tune_config: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """Swept values (choice names) and seed of a trial, from its Tune config."""
        return split_trial_config(tune_config, [p.key for p in self.parameters], self.seeds)

    def experiment_raw(self, params: dict[str, Any], seed: int | None, name: str) -> dict[str, Any]:
        """The experiment config of one trial (plain sections)."""
        raw = copy.deepcopy(self.experiment)
        for key, chosen in params.items():
            set_swept(raw, key, self.parameter(key).value(chosen))
        if seed is not None:
            for key in self.settings.seed_keys:
                set_dotted(raw, key, seed)
        raw["name"] = name
        return raw

    def build_trial(self, params: dict[str, Any], seed: int | None, name: str) -> ExperimentConfig:
        """The validated experiment of one trial."""
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        return build_config(self.experiment_raw(params, seed, name), f"{self.source} [{shown}{'' if seed is None else f', seed={seed}'}]")

    @classmethod
    def from_plain(cls, plain: dict[str, Any]) -> "SweepSpec":
        """Inverse of :meth:`to_plain` (reads a sweep folder's ``sweep.json``)."""
        return cls(
            name=plain["name"],
            experiment=plain["experiment"],
            settings=from_dict(SweepSettings, plain["settings"], "sweep"),
            parameters=[Parameter(**{**p, "choices": {name: value for name, value in p["choices"]}}) for p in plain["parameters"]],
            metric=plain["metric"],
            mode=plain["mode"],
            source=f"sweep {plain['name']}",
        )

    def to_plain(self) -> dict[str, Any]:
        """JSON-able form (stored in the sweep folder; a resumed sweep must match it)."""
        return {
            "name": self.name,
            "experiment": self.experiment,
            "settings": to_dict(self.settings),
            # Choices as pairs: JSON would turn numeric choice names into strings.
            "parameters": [{**to_dict(p), "choices": [[n, to_dict(v)] for n, v in p.choices.items()]} for p in self.parameters],
            "metric": self.metric,
            "mode": self.mode,
        }


def split_trial_config(tune_config: dict[str, Any], keys: list[str], seeds: list[int | None]) -> tuple[dict[str, Any], int | None]:
    """Swept values and seed of a Tune trial config (grid points, Optuna draws, repeated seeds)."""
    if GRID_POINT_KEY in tune_config:
        params = dict(tune_config[GRID_POINT_KEY])
    else:
        params = {k: v for k, v in tune_config.items() if k in keys}
    if SEED_KEY in tune_config:
        seed = tune_config[SEED_KEY]
    elif REPEAT_INDEX_KEY in tune_config:
        seed = seeds[int(tune_config[REPEAT_INDEX_KEY]) % len(seeds)]
    else:
        seed = seeds[0]
    return params, seed


def _absolute(path: str | None, root: Path) -> str | None:
    if path is None or "://" in path:
        return path
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else (root / expanded).resolve())


def absolutize_paths(raw: dict[str, Any], root: Path) -> None:
    """Make the experiment's relative paths absolute (Tune trials run in their own folders)."""
    data = raw.get("data") or {}
    for key in ("root", "prepared_dir"):
        if isinstance(data.get(key), str):
            data[key] = _absolute(data[key], root)
    run = raw.get("run") or {}
    for key in ("storage", "results"):
        if isinstance(run.get(key), str):
            run[key] = _absolute(run[key], root)
    for section in [raw.get("inputs") or {}] + [p.get("inputs") or {} for p in raw.get("phases") or [] if isinstance(p, dict)]:
        for key, value in section.items():
            if isinstance(value, str) and ("/" in value or Path(value).exists()):
                section[key] = _absolute(value, root)


def _data_spec_if_present(config: ExperimentConfig) -> Any:
    """The data's description when its folder exists (a world still to generate has none yet)."""
    if not (Path(config.data.root) / "dataset.json").is_file():
        return None
    from xmodal.engine.setup import prepare_run_data

    return prepare_run_data(config)[1]


def load_sweep(source: str | Path | dict[str, Any], overrides: list[str] | None = None, cwd: Path | None = None) -> SweepSpec:
    """Read and validate a sweep.

    Args:
        source: A sweep YAML file, or its contents as a mapping.
        overrides: ``key=value`` items, for experiment sections (``train.epochs=3``) and for
            the sweep itself (``sweep.num_samples=4``, ``name=my-sweep``).
        cwd: Folder relative paths are resolved against (default: the current directory).

    Raises:
        ConfigError: Anything invalid, naming the key.
    """
    cwd = (cwd or Path.cwd()).resolve()
    if isinstance(source, dict):
        data, where, default_name, folder = copy.deepcopy(source), "<sweep>", "sweep", cwd
    else:
        path = Path(source)
        data, where, default_name, folder = read_yaml(path), str(path), path.stem, path.parent
    data = merge(data, parse_overrides(overrides or []))
    base = data.pop("base", None)
    sweep_raw = data.pop("sweep", None)
    if sweep_raw is None:
        raise ConfigError(f"{where}: no 'sweep:' section; a sweep config declares its search space there")
    if not isinstance(sweep_raw, dict):
        raise ConfigError(f"{where}: 'sweep' must be a mapping of settings, got {sweep_raw!r}")
    unknown = set(data) - _TOP_LEVEL
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; known: {sorted(_TOP_LEVEL | {'base', 'sweep'})}")
    name = str(data.pop("name", default_name))
    if base is not None:
        data = merge(read_yaml(folder / base), data)
        data.pop("name", None)
    data["name"] = name

    sweep_raw = dict(sweep_raw)
    raw_parameters = sweep_raw.pop("parameters", None)
    try:
        settings = from_dict(SweepSettings, sweep_raw, "sweep")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    seeds_only = settings.search == "grid" and len(settings.seeds or []) > 1
    if raw_parameters is None and seeds_only:
        raw_parameters = {}  # a seeds-only sweep: the config itself, once per seed
    if not isinstance(raw_parameters, dict) or not (raw_parameters or seeds_only):
        raise ConfigError(
            f"{where}: sweep.parameters must map dotted config keys to their ranges or choices "
            "(or leave it out with search: grid and two or more seeds, to repeat the config per seed)"
        )
    parameters: dict[str, Parameter] = {}
    for key, raw in raw_parameters.items():
        try:
            parameters[str(key)] = parse_parameter(str(key), raw, parameters)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    absolutize_paths(data, cwd)
    settings.storage = _absolute(settings.storage, cwd)
    settings.results = _absolute(settings.results, cwd)
    for key, value in (("sweep.storage", settings.storage), ("sweep.results", settings.results)):
        if value is not None:
            refuse_job_scratch(value, key)
    base_config = build_config({k: v for k, v in data.items()}, where)
    from xmodal.methods.registry import get_method

    ranked = final_config(base_config)
    spec_metric = get_method(ranked.method).metrics(ranked.method_settings, _data_spec_if_present(ranked))
    metric = settings.metric or spec_metric.select
    mode = settings.mode or (spec_metric.mode if metric == spec_metric.select else None)
    if mode is None:
        raise ConfigError(f"{where}: sweep.metric={metric!r} is not the method's selection metric; give sweep.mode (max or min)")
    experiment = {k: v for k, v in data.items() if k != "name"}
    spec = SweepSpec(name=name, experiment=experiment, settings=settings, parameters=list(parameters.values()), metric=metric, mode=mode, source=where)
    validate_sweep(spec, base_config)
    return spec


def validate_sweep(spec: SweepSpec, base_config: ExperimentConfig) -> None:
    """Refuse swept keys that are not config keys and spaces whose configurations do not build."""
    plain = base_config.to_plain()
    settings = spec.settings
    phase_names = [p.name for p in base_config.phases]
    for param in spec.parameters:
        phase, rest = split_phase_key(param.key)
        section = rest.split(".")[0]
        if phase is not None and phase not in phase_names:
            raise ConfigError(f"{spec.source}: sweep.parameters.{param.key}: the config has no phase {phase!r}; phases: {phase_names}")
        if phase is not None and not rest:
            if param.type != "choice":
                raise ConfigError(f"{spec.source}: sweep.parameters.{param.key}: a whole phase is swept as a choice of its variants")
            continue
        if param.key == "name" or section not in _TOP_LEVEL or section in ("phases", "name", "inputs") or (phase is None and param.key == "phases"):
            raise ConfigError(
                f"{spec.source}: sweep.parameters.{param.key}: not a config key (sweepable sections: "
                f"{sorted(_TOP_LEVEL - {'phases', 'name', 'inputs'})}; a phase's key is phases.<phase>.<section>.<key>)"
            )
    for key in settings.seed_keys:
        if get_dotted(plain, key, _ABSENT) is _ABSENT:
            raise ConfigError(f"{spec.source}: sweep.seed_keys: {key!r} is not a config key")
    if settings.search == "grid":
        ranged = [p.key for p in spec.parameters if p.type != "choice"]
        if ranged:
            raise ConfigError(
                f"{spec.source}: sweep.search=grid enumerates choices only; sweep.parameters {ranged} are ranges "
                "(give them as type: choice with values: [...])"
            )
    if settings.scheduler == "asha" and settings.asha.grace_period >= spec.max_epochs:
        raise ConfigError(
            f"{spec.source}: sweep.asha.grace_period={settings.asha.grace_period} with train.epochs up to "
            f"{spec.max_epochs}: ASHA would stop no trial before its last epoch; expected grace_period < "
            f"{spec.max_epochs} (or scheduler: fifo)"
        )
    if settings.scheduler == "asha" and len(spec.seeds) > 1:
        raise ConfigError(
            f"{spec.source}: sweep.scheduler=asha with several sweep.seeds would stop some seeds of a configuration "
            "early and bias its spread; use scheduler: fifo for repeated-seed sweeps"
        )
    # Each parameter on its own (with the choices its `when` needs): every choice and both range
    # ends must build, so an error names the key at fault.
    for param in spec.parameters:
        phase, rest = split_phase_key(param.key)
        exists = (phase is not None and not rest) or get_dotted(plain, rest, _ABSENT) is not _ABSENT
        for value in param.edges():
            params = _consistent({**_enabling(param, spec), param.key: value}, spec)
            if param.key not in params:
                continue
            try:
                spec.build_trial(params, spec.seeds[0], "validate")
            except ConfigError as exc:
                what = "is not a config key" if not exists else f"value {param.value(value)!r} is invalid"
                raise ConfigError(f"{spec.source}: sweep.parameters.{param.key}: {what} ({exc})") from exc
    # Whole configurations: the grid, or random draws of the space.
    for params, seed in validation_points(spec):
        trial = spec.build_trial(params, seed, "validate")
        if settings.engine == "plain":
            _check_plain_trial(spec, trial)
    if settings.report == "zoo":
        zoo_keys(spec)
    if get_dotted(spec.experiment, "run.eval_every", 1) != 1:
        raise ConfigError(
            f"{spec.source}: run.eval_every must be 1 in a sweep: Optuna and ASHA read {spec.metric} after every epoch"
        )


@dataclass(frozen=True)
class ZooKeys:
    """The swept keys a pretext-zoo report reads (``sweep.report: zoo``).

    Attributes:
        arm: The whole-phase choice of the pretraining (``phases.pretrain``).
        task: The last phase's target layer (``phases.<last>.data.mask_layer``).
        share: The last phase's labelled share (``phases.<last>.data.labels.fraction``).
        encoder: The last phase's frozen / finetuned encoder
            (``phases.<last>.method_settings.freeze_encoder``), ``None`` if not swept.
    """

    arm: str
    task: str
    share: str
    encoder: str | None


def zoo_keys(spec: SweepSpec) -> ZooKeys:
    """The zoo keys of a sweep: arms are a whole-phase choice of an earlier phase, the rest are keys
    of its last phase.

    Raises:
        ConfigError: A key the zoo report needs is not swept.
    """
    phases = [p.get("name") for p in spec.experiment.get("phases") or [] if isinstance(p, dict)]
    if len(phases) < 2:
        raise ConfigError(f"{spec.source}: sweep.report=zoo needs a chain (pretraining phases, then the downstream phase)")
    last = f"{PHASE_PREFIX}{phases[-1]}."
    swept = {p.key for p in spec.parameters}
    arms = [p.key for p in spec.parameters if split_phase_key(p.key)[1] == "" and split_phase_key(p.key)[0] != phases[-1]]
    keys = {"task": f"{last}data.mask_layer", "share": f"{last}data.labels.fraction"}
    missing = [key for key in keys.values() if key not in swept]
    if len(arms) != 1 or missing:
        raise ConfigError(
            f"{spec.source}: sweep.report=zoo needs exactly one whole-phase choice of the pretraining (the arms; "
            f"found {arms or 'none'}) and sweeps of {list(keys.values())} (missing: {missing or 'none'})"
        )
    encoder = f"{last}method_settings.freeze_encoder"
    return ZooKeys(arm=arms[0], task=keys["task"], share=keys["share"], encoder=encoder if encoder in swept else None)


def phase_runs(config: ExperimentConfig) -> list[ExperimentConfig]:
    """The runs a trial makes: the config itself, or each phase of its chain."""
    return list(phase_configs(config).values()) if config.phases else [config]


def _check_plain_trial(spec: SweepSpec, trial: ExperimentConfig) -> None:
    """``sweep.engine: plain`` trains in the trial's own process: one worker, local files."""
    if "://" in spec.settings.storage:
        raise ConfigError(f"{spec.source}: sweep.engine=plain writes local checkpoints; sweep.storage={spec.settings.storage!r} is remote")
    for run in phase_runs(trial):
        if run.scaling.num_workers != 1:
            raise ConfigError(
                f"{spec.source}: sweep.engine=plain trains each run in one process; {run.name} has "
                f"scaling.num_workers={run.scaling.num_workers} (set 1, or use sweep.engine: train)"
            )


def validation_points(spec: SweepSpec) -> list[tuple[dict[str, Any], int | None]]:
    """Configurations checked before a sweep starts: the whole grid, or each parameter's
    choices / range ends plus random draws of the space (conditional parameters included)."""
    if spec.settings.search == "grid":
        combos: list[dict[str, Any]] = spec.grid_points()
    else:
        defaults = {p.key: p.edges()[0] for p in spec.parameters}
        combos = [_consistent({**defaults, p.key: v}, spec) for p in spec.parameters for v in p.edges()]
        rng = random.Random(spec.settings.sampler_seed)
        combos += [_draw(spec, rng) for _ in range(min(VALIDATION_DRAWS, max(spec.settings.num_samples, 8)))]
    return [(params, seed) for params, seed in itertools.product(combos, spec.seeds)]


def _enabling(param: Parameter, spec: SweepSpec) -> dict[str, Any]:
    """Choices that make ``param`` exist (its ``when``, and theirs, recursively)."""
    chosen: dict[str, Any] = {}
    for key, allowed in param.when.items():
        chosen.update(_enabling(spec.parameter(key), spec))
        chosen[key] = allowed[0]
    return chosen


def _consistent(params: dict[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """Drop parameters whose ``when`` does not hold for the other values."""
    kept: dict[str, Any] = {}
    for param in spec.parameters:
        if param.key in params and param.active(kept):
            kept[param.key] = params[param.key]
    return kept


def _draw(spec: SweepSpec, rng: random.Random) -> dict[str, Any]:
    chosen: dict[str, Any] = {}
    for param in spec.parameters:
        if param.active(chosen):
            chosen[param.key] = param.draw(rng)
    return chosen
