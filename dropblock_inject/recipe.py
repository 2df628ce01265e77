"""Recipe files: per-architecture rules written down as YAML, and the registry that finds them.

A recipe is the :class:`~dropblock_inject.Rules` for a family of models plus the models it
matches and its schedule defaults. The shipped recipes live in the repository's ``recipes/``
folder, installed as the package ``dropblock_inject.recipes``; a user's own YAML file works the
same way. The schema is documented in ``recipes/README.md``.

Example:
    >>> r = load_recipe("resnet")
    >>> r.rules.block_size, r.rules.stage_gamma_scale
    (7, {-2: 0.25})
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from dropblock_inject.errors import RecipeError
from dropblock_inject.pipeline.rules import Rules

__all__ = ["Recipe", "attribute_path", "list_recipes", "load_recipe", "model_names", "recipe_for", "resolve_rules"]

TOP_KEYS = {
    "base": "the name or path of a recipe this one extends",
    "match": "a mapping with 'models' (fnmatch patterns of model names: timm, tv:, hf:, smp:) and 'classes'",
    "drop_prob": "a float in [0, 1] (or give keep_prob)",
    "keep_prob": "a float in [0, 1], the paper's keep probability (1 - drop_prob)",
    "stages": "an int (the last N stages), a list of stage indices, or a mapping with 'indices', 'strides', 'modules'",
    "block_size": "an int, a list of ints per spatial dim, or a mapping with 'size', 'fraction', 'per_stage'",
    "gamma_scale": "a mapping stage index -> rate scale (e.g. {-2: 0.25})",
    "gamma": "'paper' or 'calibrated'",
    "shared_channels": "true or false",
    "residual_branch": "true or false",
    "shortcut": "true or false",
    "include": "a list of module-path patterns",
    "exclude": "a list of module-path patterns",
    "overrides": "a mapping pattern -> {drop_prob, block_size, gamma_scale}",
    "scope": "'auto', 'all' or a module path",
    "schedule": "a mapping with 'kind' (linear, cosine, constant) and 'warmup_fraction' in [0, 1)",
}
SCHEDULE_KINDS = ("linear", "cosine", "constant")


@dataclass
class Recipe:
    """A loaded recipe.

    Attributes:
        name: The file's stem (``resnet`` for ``resnet.yaml``).
        rules: The rules it sets.
        models: fnmatch patterns of the model names it is for (timm names, ``tv:<builder>``,
            ``hf:<config.model_type>``, ``smp:<architecture>-<encoder>``; see :func:`model_names`).
        classes: Class names it is for (``ResNet`` or ``torchvision.models.resnet.ResNet``).
        schedule: ``{"kind": ..., "warmup_fraction": ...}``.
        description: The comment block at the top of the file (which paper or reference it follows).
        path: Where it was loaded from.
    """

    name: str
    rules: Rules
    models: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    schedule: dict[str, Any] = field(default_factory=lambda: {"kind": "linear", "warmup_fraction": 0.0})
    description: str = ""
    path: str = ""


def _recipe_dir() -> Path:
    return Path(str(resources.files("dropblock_inject.recipes")))


def list_recipes(pattern: str = "*") -> list[str]:
    """Names of the shipped recipes matching an fnmatch ``pattern``.

    Example:
        >>> "resnet" in list_recipes("res*")
        True
    """
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml") if fnmatch.fnmatchcase(p.stem, pattern))


def load_recipe(path_or_name: str | Path) -> Recipe:
    """Load a shipped recipe by name, or any YAML file by path.

    A relative ``base:`` path is found next to the file that names it. Files are parsed once
    and read again when they change on disk.

    Raises:
        RecipeError: Unknown name, unreadable file, or a malformed key (the message names the
            file, the key and what is allowed).
    """
    path = str(_find(path_or_name))
    raw, header = _read(path)
    merged = _overlay(_bases(path, raw, {os.path.realpath(path)}), raw)
    return _build(path, merged, header)


def _find(path_or_name: str | Path) -> Path:
    path = Path(path_or_name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if path.is_dir():
            raise RecipeError(f"recipe file {str(path)!r} is a folder: give a YAML file in it, or a recipe name")
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return path
    shipped = _recipe_dir() / f"{path_or_name}.yaml"
    if not shipped.is_file():
        raise RecipeError(f"unknown recipe {str(path_or_name)!r}; shipped recipes: {', '.join(list_recipes())}")
    return shipped


def _bases(path: str, raw: dict[str, Any], seen: set[str]) -> dict[str, Any]:
    """The keys that ``raw``'s chain of bases sets, nearest last (``match`` is never inherited).

    ``seen`` holds the real paths of the files on the chain so far, ``path``'s included.
    """
    if "base" not in raw:
        return {}
    base = raw["base"]
    if not isinstance(base, str):
        raise RecipeError(f"{path}: key 'base' must be {TOP_KEYS['base']}, got {base!r}")
    # a relative path is relative to the folder of the file that names it (joining keeps an absolute one)
    base_path = str(_find(Path(path).parent / base if base.endswith((".yaml", ".yml")) else base))
    real = os.path.realpath(base_path)
    if real == os.path.realpath(path):
        raise RecipeError(f"{path}: a recipe cannot extend itself")
    if real in seen:
        raise RecipeError(f"{base_path}: 'base' recipes form a cycle")
    data, _ = _read(base_path)
    return _overlay(_bases(base_path, data, seen | {real}), {k: v for k, v in data.items() if k != "match"})


def _overlay(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child``'s keys over ``base``'s; a rate given as keep_prob replaces a drop_prob and back."""
    merged = dict(base)
    for rate, other in (("keep_prob", "drop_prob"), ("drop_prob", "keep_prob")):
        if rate in child:
            merged.pop(other, None)
    merged.update({k: v for k, v in child.items() if k != "base"})
    return merged


def _read(path: str) -> tuple[dict[str, Any], str]:
    """The file's keys (a fresh copy, free to change) and its header comment."""
    try:
        stat = os.stat(path)
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from e
    data, header = _parse(path, os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    return copy.deepcopy(data), header


@functools.lru_cache(maxsize=256)
def _parse(path: str, real_path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], str]:
    """Parse and check one file; cached on where it is and when it last changed (the last three args)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RecipeError(f"cannot read recipe {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text (byte {e.start}): save the file as UTF-8") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}, _header(text)
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {unknown}; allowed: {', '.join(TOP_KEYS)}")
    if "drop_prob" in data and "keep_prob" in data:
        raise RecipeError(f"{path}: give drop_prob or keep_prob, not both")
    return data, _header(text)


def _header(text: str) -> str:
    """The comment block at the top of a file's ``text``."""
    lines = []
    for line in text.splitlines():
        if not line.strip() and not lines:
            continue
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return "\n".join(lines).strip()


def _build(path: str, data: dict[str, Any], description: str) -> Recipe:
    match = _table(path, "match", data.get("match", {}), ("models", "classes"))
    rules = Rules(source=path, **_rule_fields(path, data))
    return Recipe(
        name=Path(path).stem,
        rules=rules,
        models=_str_list(path, "match.models", match.get("models", [])),
        classes=_str_list(path, "match.classes", match.get("classes", [])),
        schedule=_schedule(path, data.get("schedule", {})),
        description=description,
        path=path,
    )


def _rule_fields(path: str, data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "keep_prob" in data:
        out["drop_prob"] = 1.0 - _number(path, "keep_prob", data["keep_prob"])
    if "drop_prob" in data:
        out["drop_prob"] = _number(path, "drop_prob", data["drop_prob"])
    if "stages" in data:
        out.update(_stages(path, data["stages"]))
    if "block_size" in data:
        out.update(_block(path, data["block_size"]))
    if "gamma_scale" in data:
        table = _typed(path, "gamma_scale", data["gamma_scale"], dict)
        out["stage_gamma_scale"] = {
            _int(path, "gamma_scale", k): _number(path, "gamma_scale", v) for k, v in table.items()
        }
    for key in ("gamma", "scope"):
        if key in data:
            out[key] = _typed(path, key, data[key], str)
    for key in ("shared_channels", "residual_branch", "shortcut"):
        if key in data:
            out[key] = _typed(path, key, data[key], bool)
    for key in ("include", "exclude"):
        if key in data:
            out[key] = _str_list(path, key, data[key])
    if "overrides" in data:
        out["overrides"] = {str(k): _typed(path, f"overrides.{k}", v, dict)
                            for k, v in _typed(path, "overrides", data["overrides"], dict).items()}  # fmt: skip
    return out


def _stages(path: str, value: Any) -> dict[str, Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"stages": value}
    if isinstance(value, list):
        return {"stages": [_int(path, "stages", v) for v in value]}
    table = _table(path, "stages", value, ("indices", "strides", "modules"))
    out: dict[str, Any] = {}
    if "indices" in table:
        out["stages"] = [
            _int(path, "stages.indices", v) for v in _typed(path, "stages.indices", table["indices"], list)
        ]
    if "strides" in table:
        out["strides"] = [
            _int(path, "stages.strides", v) for v in _typed(path, "stages.strides", table["strides"], list)
        ]
    if "modules" in table:
        out["modules"] = _str_list(path, "stages.modules", table["modules"])
    return out


def _block(path: str, value: Any) -> dict[str, Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return {"block_size": value}
    if isinstance(value, list):
        return {"block_size": tuple(_int(path, "block_size", v) for v in value)}
    table = _table(path, "block_size", value, ("size", "fraction", "per_stage"))
    out: dict[str, Any] = {}
    if "size" in table:
        out.update(_block(path, table["size"]))
    if "fraction" in table:
        out["block_fraction"] = _number(path, "block_size.fraction", table["fraction"])
    if "per_stage" in table:
        per_stage = _typed(path, "block_size.per_stage", table["per_stage"], dict)
        out["stage_block_size"] = {_int(path, "block_size.per_stage", k): _block(path, v)["block_size"]
                                   for k, v in per_stage.items()}  # fmt: skip
    return out


def _schedule(path: str, value: Any) -> dict[str, Any]:
    table = _table(path, "schedule", value, ("kind", "warmup_fraction"))
    kind = table.get("kind", "linear")
    if kind not in SCHEDULE_KINDS:
        raise RecipeError(f"{path}: schedule.kind must be one of {SCHEDULE_KINDS}, got {kind!r}")
    warmup = _number(path, "schedule.warmup_fraction", table.get("warmup_fraction", 0.0))
    if not 0.0 <= warmup < 1.0:
        raise RecipeError(f"{path}: schedule.warmup_fraction must be in [0, 1), got {warmup}")
    return {"kind": kind, "warmup_fraction": warmup}


def _table(path: str, key: str, value: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A mapping under ``key`` whose keys are all in ``allowed``."""
    table = _typed(path, key, value, dict)
    unknown = set(table) - set(allowed)
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {sorted(unknown)} under {key!r}; allowed: {', '.join(allowed)}")
    return table


def _typed(path: str, key: str, value: Any, kind: type) -> Any:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        allowed = TOP_KEYS.get(key.split(".")[0], kind.__name__)
        raise RecipeError(f"{path}: key {key!r} must be {allowed}, got {value!r}")
    return value


def _number(path: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{path}: key {key!r} must be a number, got {value!r}")
    return float(value)


def _int(path: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"{path}: key {key!r} takes ints, got {value!r}")
    return value


def _str_list(path: str, key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecipeError(f"{path}: key {key!r} must be a list of strings, got {value!r}")
    return list(value)


# The names a model carries, as (the package its class comes from, a prefix, an attribute path): timm's
# architecture; HF's config.model_type and that of its backbone config (UperNet); segmentation_models_pytorch's
# name, "<architecture>-<encoder>" (u-resnet34, fpn-tu-convnext_tiny).
MODEL_NAMES = (
    ("", "", "pretrained_cfg.architecture"),
    ("transformers.", "hf:", "config.model_type"),
    ("transformers.", "hf:", "config.backbone_config.model_type"),
    ("segmentation_models_pytorch.", "smp:", "name"),
)


def model_names(model: nn.Module) -> list[str]:
    """The names ``recipe="auto"`` matches a model by (``resnet50``, ``hf:convnext``, ``smp:u-resnet34``).

    Example:
        >>> import timm
        >>> model_names(timm.create_model("resnet18"))
        ['resnet18']
    """
    package = type(model).__module__ + "."
    names = []
    for package_prefix, prefix, attribute in MODEL_NAMES:
        value = attribute_path(model, attribute)
        if package.startswith(package_prefix) and isinstance(value, str) and value:
            names.append(prefix + value)
    return names


def attribute_path(obj: Any, path: str) -> Any:
    """``obj.a.b`` for ``"a.b"``, reading dict keys too; None where a step is missing.

    Example:
        >>> attribute_path({"a": {"b": 1}}, "a.b"), attribute_path({"a": 1}, "a.c")
        (1, None)
    """
    for name in path.split("."):
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def recipe_for(model: nn.Module, name: str | None = None) -> Recipe:
    """The shipped recipe for ``model``'s family, else ``default``.

    Matches the model's names (``name``, and those it carries: timm's architecture,
    ``hf:<config.model_type>``, ``smp:<architecture>-<encoder>``; see :func:`model_names`) against
    each recipe's ``match.models`` and the model's class against ``match.classes``; a name match
    beats a class match, then the most specific pattern (fewest wildcards, then longest) wins.
    """
    names = [n for n in (name, *model_names(model)) if n]
    classes = [type(model).__name__, f"{type(model).__module__}.{type(model).__qualname__}"]
    best: tuple[tuple[int, int, int], Recipe] | None = None
    for recipe_name in list_recipes():
        recipe = load_recipe(recipe_name)
        for pattern in recipe.models:
            if any(fnmatch.fnmatchcase(n, pattern) for n in names):
                best = _more_specific(best, pattern, recipe, by_name=True)
        for pattern in recipe.classes:
            if any(fnmatch.fnmatchcase(c, pattern) for c in classes):
                best = _more_specific(best, pattern, recipe, by_name=False)
    return best[1] if best else load_recipe("default")


def _more_specific(
    best: tuple[tuple[int, int, int], Recipe] | None, pattern: str, recipe: Recipe, *, by_name: bool
) -> tuple[tuple[int, int, int], Recipe]:
    score = (int(by_name), -sum(pattern.count(c) for c in "*?["), len(pattern))
    return (score, recipe) if best is None or score > best[0] else best


def resolve_rules(recipe: Recipe | Rules | str | Path | None, model: nn.Module, name: str | None = None) -> Rules:
    """The :class:`Rules` for a ``recipe`` argument: None (the built-in default), ``"auto"``,
    a shipped name, a YAML path, a :class:`Recipe` or :class:`Rules`."""
    if recipe is None:
        return Rules()
    if isinstance(recipe, Rules):
        return recipe
    if isinstance(recipe, Recipe):
        return recipe.rules
    if recipe == "auto":
        return recipe_for(model, name).rules
    return load_recipe(recipe).rules
