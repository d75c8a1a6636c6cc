"""Recipes: product variants by number, each a bundle with its own thresholds and ROI, loaded ahead.

The PLC asks for one with ``recipe_request``; a trigger latches it, so a part is
judged with the recipe asked for when it was triggered, never with one switched
in during its inspection. Every recipe is loaded and warmed up at start (a switch
is then a lookup); recipes added or changed by a reload load in the background
while ``recipe_changing`` tells the PLC to wait. A bundle that cannot be loaded
makes its recipe unavailable (triggers for it fail with code 12), never the old one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from anomalyd.config import AppConfig, Roi, ThresholdsConfig
from anomalyd.daemon.handshake import Handshake
from anomalyd.engines.base import EngineHooks
from anomalyd.engines.select import open_inspector
from anomalyd.log import get_logger
from anomalyd.model.bundle import load_bundle
from anomalyd.model.inspector import Inspector
from anomalyd.model.signing import load_trusted_keys

log = get_logger(__name__)


@dataclass(frozen=True)
class RecipeSpec:
    """What the YAML says about one recipe (recipe 0 is the single-bundle config)."""

    number: int
    name: str
    bundle: Path
    thresholds: ThresholdsConfig
    roi: tuple[int, int, int, int] | None


@dataclass(frozen=True)
class Recipe:
    """A loaded recipe: the spec and its warmed-up inspector."""

    spec: RecipeSpec
    inspector: Inspector
    load_s: float
    resolved: Path = Path()  # where spec.bundle pointed when loaded (a promotion moves a symlink)

    @property
    def number(self) -> int:
        return self.spec.number

    @property
    def bundle_id(self) -> str:
        return self.inspector.bundle.bundle_id

    @property
    def calibration_median(self) -> float:
        """Median normalised score of the good images held back at fit (the drift reference)."""
        stats = self.inspector.bundle.spec.calibration.holdout_normalised
        return stats.p50 if stats is not None else 0.8

    @property
    def threshold(self) -> float:
        t = self.spec.thresholds.image
        return t if t is not None else self.inspector.bundle.suggested_threshold


def _resolved(path: Path) -> Path:
    try:
        return path.resolve(strict=True)
    except (OSError, RuntimeError):
        return path


def _roi(roi: Roi | None) -> tuple[int, int, int, int] | None:
    return (roi.x, roi.y, roi.width, roi.height) if roi else None


def recipe_specs(config: AppConfig) -> tuple[int, dict[int, RecipeSpec]]:
    """(default recipe, specs by number) from the config."""
    if not config.recipes:
        spec = RecipeSpec(0, "", config.model.bundle, config.thresholds, _roi(config.camera.roi))
        return 0, {0: spec}
    specs = {
        n: RecipeSpec(n, r.name, r.bundle, r.thresholds or config.thresholds, _roi(r.roi or config.camera.roi))
        for n, r in config.recipes.items()
    }
    return config.model.default_recipe, specs


class RecipeBook:
    def __init__(self, config: AppConfig, handshake: Handshake, opener: Callable[[RecipeSpec], Inspector]) -> None:
        self.handshake = handshake
        self._open = opener
        self._lock = threading.Lock()
        self.default, self.specs = recipe_specs(config)
        self._recipes: dict[int, Recipe] = {}
        self._failed: dict[int, str] = {}
        self._loading: set[int] = set()
        self._again: set[int] = set()  # reloaded while loading: load once more when the load ends
        self._retired: list[Inspector] = []  # closed between parts: the loop may still hold one

    @staticmethod
    def opener(config: AppConfig, hooks: EngineHooks = EngineHooks()) -> Callable[[RecipeSpec], Inspector]:
        """Open and warm up the inspector of a recipe with the configured engine and search."""
        trusted = load_trusted_keys(config.model.trusted_keys) if config.model.trusted_keys else []

        def open_spec(spec: RecipeSpec) -> Inspector:
            # The link is resolved once inside load_bundle; the inspector is built from the bytes it verified.
            bundle = load_bundle(spec.bundle, trusted_keys=trusted)
            inspector = open_inspector(bundle, config.engine, config.search, spec.roi, hooks)
            try:
                inspector.warm_up()
            except BaseException:
                inspector.close()
                raise
            return inspector

        return open_spec

    # ------------------------------------------------------------ loading
    def load_all(self) -> None:
        """Load every recipe now (start-up: a bundle that cannot load stops the start, exit 2)."""
        for spec in self.specs.values():
            self._recipes[spec.number] = self._load(spec)
        self._publish()

    def _load(self, spec: RecipeSpec) -> Recipe:
        started = time.perf_counter()
        inspector = self._open(spec)
        # Where the bundle was read from, as the loader resolved it: never a second look at the link.
        recipe = Recipe(spec, inspector, time.perf_counter() - started, inspector.bundle.path)
        log.info(
            "recipe.loaded",
            recipe=spec.number,
            name=spec.name,
            bundle=inspector.bundle.bundle_id,
            load_s=round(recipe.load_s, 3),
        )
        return recipe

    def _publish(self) -> None:
        with self._lock:
            known = set(self.specs) | {0}
            loaded = set(self._recipes) | ({0} if self.default in self._recipes else set())
            failed = set(self._failed)
        self.handshake.set_recipes(self.default, known, loaded, failed)

    def apply(self, config: AppConfig) -> list[int]:
        """A reload: new thresholds at once; new or re-pointed bundles load in the background.

        A recipe already loading is not loaded twice at once: the reload is
        remembered and, when the running load ends, the recipe loads again from
        the spec and the link as they are then (a rollback during a promote's
        load is never dropped).
        """
        default, specs = recipe_specs(config)
        to_load: list[RecipeSpec] = []
        with self._lock:
            self.default = default
            for n in list(self._recipes):
                if n not in specs:  # removed
                    self._retired.append(self._recipes.pop(n).inspector)
            for n in list(self._failed):
                if n not in specs:
                    del self._failed[n]
            for n, spec in specs.items():
                if n in self._loading:
                    self._again.add(n)  # applied when the running load ends
                    continue
                current = self._recipes.get(n)
                same_bundle = current is not None and current.resolved == _resolved(spec.bundle)
                if current is not None and same_bundle and current.spec.roi == spec.roi:
                    self._recipes[n] = replace(current, spec=spec)  # thresholds or name only
                    continue
                to_load.append(spec)
                self._loading.add(n)
                self._failed.pop(n, None)
                if current is not None:  # the old bundle must not judge the new recipe's parts
                    self._retired.append(self._recipes.pop(n).inspector)
            self.specs = specs
        self._publish()
        for spec in to_load:
            self._start_load(spec)
        return [s.number for s in to_load]

    def _start_load(self, spec: RecipeSpec) -> None:
        threading.Thread(target=self._load_later, args=(spec,), name=f"recipe-{spec.number}", daemon=True).start()

    def _load_later(self, spec: RecipeSpec) -> None:
        n = spec.number
        try:
            recipe: Recipe | None = self._load(spec)
            error = ""
        except Exception as exc:  # a bad bundle after a reload: this recipe fails, the others run on
            recipe, error = None, str(exc) or type(exc).__name__
        again: RecipeSpec | None = None
        with self._lock:
            latest = self.specs.get(n)
            if n in self._again or latest != spec:
                # Reloaded meanwhile: what just loaded may be stale; load again as things are now.
                self._again.discard(n)
                if recipe is not None:
                    self._retired.append(recipe.inspector)
                if latest is None:
                    self._loading.discard(n)  # removed by the reload
                else:
                    again = latest
            else:
                self._loading.discard(n)
                if recipe is not None:
                    self._recipes[n] = recipe
                else:
                    self._failed[n] = error
        if again is not None:
            log.info("recipe.reload_again", recipe=n, reason="reloaded while loading")
            self._start_load(again)
            return
        if recipe is None and error:
            log.error("recipe.load_failed", recipe=n, bundle=str(spec.bundle), error=error)
        self._publish()

    # ------------------------------------------------------------ use
    def get(self, number: int) -> Recipe | None:
        """The loaded recipe ``number`` (0: the default), or None."""
        with self._lock:
            return self._recipes.get(number or self.default)

    def resolved(self) -> dict[int, str]:
        """Where each loaded recipe's bundle path pointed when it was loaded."""
        with self._lock:
            return {n: str(r.resolved) for n, r in self._recipes.items()}

    def state(self) -> dict[str, object]:
        with self._lock:
            return {
                "default": self.default,
                "loaded": {n: {"name": r.spec.name, "bundle": r.bundle_id} for n, r in self._recipes.items()},
                "loading": sorted(self._loading),
                "failed": dict(self._failed),
            }

    def collect(self) -> None:
        """Between parts: close inspectors that were replaced."""
        with self._lock:
            retired, self._retired = self._retired, []
        for inspector in retired:
            inspector.close()

    def close(self) -> None:
        self.collect()
        with self._lock:
            recipes, self._recipes = list(self._recipes.values()), {}
        for recipe in recipes:
            recipe.inspector.close()
