"""The YAML configuration: the schema of the whole file and its hash.

Every field carries a title, description, unit (where it has one) and bounds, so
the schema documents itself (``anomalyd check-config --schema``). Backend sections
(camera, plc, engine) are unions discriminated by ``type``, gathered from the
registries: each backend's settings class lives in the backend's own file, and
those files import nothing heavy at import time, so validating a file stays fast.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, model_validator

from anomalyd.drivers.camera.base import CAMERAS, CameraSettings
from anomalyd.drivers.plc.base import PLC_LINKS, PlcSettings
from anomalyd.engines.base import EXTRACTORS, EngineSettings
from anomalyd.settings import ConfigPath, Roi, Section, is_loopback, setting

__all__ = ["AppConfig", "Roi", "Section", "config_hash", "is_loopback", "setting"]

if TYPE_CHECKING:
    # mypy sees the common base; code that needs one backend's settings narrows with isinstance.
    CameraConfig = CameraSettings
    PlcConfig = PlcSettings
    EngineConfig = EngineSettings
else:
    CameraConfig = CAMERAS.union()
    PlcConfig = PLC_LINKS.union()
    EngineConfig = EXTRACTORS.union()


# ---------------------------------------------------------------- model, engine
class ModelConfig(Section):
    bundle: ConfigPath = setting(
        Path("bundle"), "Model bundle", "Folder written by `anomalyd fit` (recipe 0 when there are no recipes)."
    )
    default_recipe: int = setting(
        0,
        "Default recipe",
        "Recipe used while the PLC's recipe_request is 0 (with recipes: one of them).",
        ge=0,
        le=65535,
    )
    trusted_keys: list[ConfigPath] = setting(
        [],
        "Trusted signing keys",
        "Ed25519 public keys (signing.pub from `anomalyd keygen`); when set, a bundle not signed by one of "
        "them is refused (empty: bundles are not authenticated).",
    )


class SearchConfig(Section):
    type: Literal["auto", "faiss", "torch"] = setting(
        "auto", "Search backend", "auto: faiss where installed (on a GPU: built with CUDA), else torch."
    )
    device: str = setting("auto", "Device", "auto (the extractor's device), cpu, cuda, cuda:1.")


# ---------------------------------------------------------------- decision
class ThresholdsConfig(Section):
    image: float | None = setting(
        None,
        "Image threshold",
        "Fail at or above this normalised score (empty: the bundle's suggestion).",
        gt=0,
        le=1000,
    )
    warn: float | None = setting(None, "Warn threshold", "Warn at or above this score, below image.", gt=0, le=1000)
    pixel: float | None = setting(
        None, "Pixel threshold", "Normalised map value that counts a pixel as defective (for min_area).", gt=0, le=1000
    )
    min_area_px: int = setting(
        0, "Minimum defect area", "Fail only if this many pixels exceed pixel.", "px", ge=0, le=1_000_000_000
    )

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdsConfig:
        if self.warn is not None and self.image is not None and self.warn >= self.image:
            raise ValueError(f"warn ({self.warn}) must be below image ({self.image})")
        if self.min_area_px > 0 and self.pixel is None:
            raise ValueError("min_area_px needs pixel (the per-pixel threshold)")
        return self


class DaemonConfig(Section):
    trigger: Literal["plc", "hardware", "free_run"] = setting(
        "plc",
        "Trigger mode",
        "plc: rising edge of the PLC's trigger bit; hardware: the camera is wired to the "
        "line; free_run: inspect frames as they come.",
    )
    budget_ms: float = setting(
        100.0, "Budget", "Frame-to-PLC-write deadline; late results are failed.", "ms", gt=0, le=60000
    )
    heartbeat_ms: int = setting(
        500, "Heartbeat period", "Heartbeat counter period, also when idle.", "ms", ge=50, le=60000
    )
    grab_timeout_ms: int = setting(
        1000, "Grab timeout", "Longest wait for a frame after a trigger.", "ms", gt=0, le=60000
    )
    poll_ms: int = setting(5, "PLC poll period", "How often the command block is read.", "ms", ge=1, le=1000)
    max_inspections: int = setting(0, "Stop after", "Exit after this many inspections (0: never).", ge=0, le=2**32)
    data_dir: ConfigPath = setting(Path("var"), "Data folder", "Records database and reject archive go here.")
    records_retention_days: float = setting(
        90.0, "Keep records", "Delete records older than this.", "days", gt=0, le=36500
    )
    records_retention_count: int = setting(1_000_000, "Keep at most", "Most records kept.", ge=1, le=10**10)
    line: str = setting(
        "",
        "Line name",
        "Names this station in metrics (anomalyd_build_info), MQTT messages and the page ('': the host name).",
        max_length=64,
    )


class PageConfig(Section):
    enabled: bool = setting(True, "Operator page", "Serve the operator page (verdicts, images, counts, state).")
    host: str = setting(
        "127.0.0.1", "Listen address", "Loopback by default; any other address needs a token (see token_file)."
    )
    port: int = setting(8080, "Port", "HTTP port of the page (0: any free port).", ge=0, le=65535)
    token_file: ConfigPath | None = setting(
        None,
        "Token file",
        "File holding the access token (or set ANOMALYD_PAGE_TOKEN); required when host is not loopback.",
    )
    filmstrip: int = setting(24, "Filmstrip", "How many recent results the page keeps (with images).", ge=1, le=200)
    max_clients: int = setting(
        16, "Most page clients", "Live page streams served at once; the next is answered 503.", ge=1, le=1000
    )
    stale_after_s: float = setting(
        60.0,
        "Stale after",
        "With no new part for this long, the page greys the last verdict out and says how old it is.",
        "s",
        gt=0,
        le=86400,
    )


class DriftConfig(Section):
    enabled: bool = setting(True, "Drift alarm", "Watch the parts' scores against the bundle's calibration.")
    window: int = setting(200, "Window", "Parts in the rolling median.", ge=10, le=100_000)
    min_parts: int = setting(50, "Minimum parts", "No alarm before this many parts of a recipe.", ge=5, le=100_000)
    margin: float = setting(
        0.25,
        "Margin",
        "Alarm when the rolling median moves this far from the held-back good parts' median (score units).",
        gt=0,
        le=100,
    )


class RecordsConfig(Section):
    required: bool = setting(
        False,
        "Records required",
        "Fail every part (error 11) while records cannot be written; off: keep inspecting, "
        "keep the records in memory and retry, and raise records_failing.",
    )
    max_pending: int = setting(
        100_000, "Record buffer", "Records kept in memory while the database refuses them.", ge=100, le=10_000_000
    )
    journal_mb: float = setting(
        16.0,
        "Record journal",
        "Disk space allocated at start for records the database refuses (a full disk); beyond it they go to stderr.",
        "MiB",
        ge=0.0625,
        le=100_000,
    )


class MqttConfig(Section):
    """Results to the MES (and a fleet) over MQTT; off unless enabled."""

    enabled: bool = setting(False, "MQTT", "Publish every answer and the daemon's state to an MQTT broker.")
    host: str = setting("127.0.0.1", "Broker", "Host name or address of the broker.", min_length=1)
    port: int = setting(1883, "Broker port", "1883 plain, usually 8883 with TLS.", ge=1, le=65535)
    topic_prefix: str = setting(
        "",
        "Topic prefix",
        "Results on <prefix>/result, state on <prefix>/state ('': anomalyd/<daemon.line>).",
        pattern=r"^[^#+]*$",
    )
    client_id: str = setting("", "Client id", "MQTT client id ('': anomalyd-<daemon.line>).")
    tls: bool = setting(False, "TLS", "Connect with TLS (the broker's certificate checked against ca_file).")
    ca_file: ConfigPath | None = setting(None, "CA file", "CA certificate(s) the broker's certificate must chain to.")
    cert_file: ConfigPath | None = setting(None, "Client certificate", "Client certificate for mutual TLS.")
    key_file: ConfigPath | None = setting(None, "Client key", "Key of the client certificate.")
    username: str = setting("", "User", "User name for the broker ('': none).")
    password_file: ConfigPath | None = setting(
        None, "Password file", "File holding the user's password (kept out of the YAML, readable by the service)."
    )
    keepalive_s: int = setting(30, "Keep-alive", "MQTT keep-alive; the last will fires after 1.5×.", "s", ge=5, le=3600)
    queue_size: int = setting(
        10_000,
        "Queue",
        "Results kept while the broker is away, sent in order when it returns; beyond, the oldest is dropped "
        "(counted; the records database has every result).",
        ge=10,
        le=10_000_000,
    )

    @model_validator(mode="after")
    def _tls_pieces(self) -> MqttConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mqtt.cert_file and mqtt.key_file go together")
        if (self.ca_file or self.cert_file) and not self.tls:
            raise ValueError("mqtt.ca_file/cert_file need tls: true")
        if self.password_file is not None and not self.username:
            raise ValueError("mqtt.password_file needs mqtt.username")
        return self


class ArchiveConfig(Section):
    enabled: bool = setting(True, "Archive", "Save NG frames with a heatmap overlay.")
    ok_sample_every: int = setting(0, "OK sample", "Also save every Nth OK frame (0: none).", ge=0, le=1_000_000_000)
    quota_mb: float = setting(
        1024.0, "Disk quota", "Oldest images are deleted above this size.", "MiB", gt=0, le=10_000_000
    )
    min_free_mb: float = setting(
        512.0,
        "Free-space reserve",
        "No image is saved while the disk has less free space than this: it is kept for the records database.",
        "MiB",
        ge=0,
        le=10_000_000,
    )


class MetricsConfig(Section):
    enabled: bool = setting(True, "Metrics", "Serve Prometheus metrics and /healthz.")
    host: str = setting("127.0.0.1", "Listen address", "Loopback by default; widen only behind a firewall.")
    port: int = setting(9108, "Port", "HTTP port of /metrics and /healthz (0: any free port).", ge=0, le=65535)


class LoggingConfig(Section):
    level: Literal["debug", "info", "warning", "error"] = setting("info", "Level", "Least severe level logged.")
    format: Literal["auto", "json", "console"] = setting(
        "auto", "Format", "auto: JSON lines when stdout is not a terminal (journald), console otherwise."
    )


class RecipeConfig(Section):
    """One product variant: its bundle and, optionally, its own thresholds and ROI."""

    name: str = setting("", "Name", "Shown on the operator page and in the log.", max_length=64)
    bundle: ConfigPath = setting(..., "Bundle", "Folder written by `anomalyd fit` for this variant.")
    thresholds: ThresholdsConfig | None = setting(None, "Thresholds", "This recipe's rules (empty: `thresholds`).")
    roi: Roi | None = setting(None, "Region of interest", "This recipe's crop (empty: `camera.roi`).")


class AppConfig(Section):
    """The whole configuration file."""

    camera: CameraConfig = setting(CAMERAS.settings_for("simulated")(), "Camera", "Where frames come from.")
    plc: PlcConfig = setting(PLC_LINKS.settings_for("s7")(), "PLC", "Where verdicts go.")
    model: ModelConfig = setting(ModelConfig(), "Model", "The model bundle.")
    engine: EngineConfig = setting(EXTRACTORS.settings_for("auto")(), "Engine", "What runs the feature extractor.")
    search: SearchConfig = setting(SearchConfig(), "Search", "What searches the memory bank.")
    thresholds: ThresholdsConfig = setting(ThresholdsConfig(), "Thresholds", "Decision rules (reloadable).")
    daemon: DaemonConfig = setting(DaemonConfig(), "Daemon", "The inspection loop.")
    archive: ArchiveConfig = setting(ArchiveConfig(), "Archive", "Reject images on disk.")
    metrics: MetricsConfig = setting(MetricsConfig(), "Metrics", "Prometheus endpoint.")
    logging: LoggingConfig = setting(LoggingConfig(), "Logging", "Log level and format.")
    records: RecordsConfig = setting(RecordsConfig(), "Records", "What to do when records cannot be written.")
    recipes: dict[Annotated[int, Field(ge=1, le=65535)], RecipeConfig] = setting(
        {}, "Recipes", "Product variants by number; the PLC picks one with recipe_request (reloadable)."
    )
    page: PageConfig = setting(PageConfig(), "Operator page", "The screen beside the line.")
    drift: DriftConfig = setting(DriftConfig(), "Drift alarm", "Warn before a drifting camera rejects parts.")
    mqtt: MqttConfig = setting(MqttConfig(), "MQTT", "Results to the MES over MQTT.")

    @model_validator(mode="after")
    def _default_recipe_exists(self) -> AppConfig:
        if self.recipes and self.model.default_recipe not in self.recipes:
            raise ValueError(
                f"model.default_recipe {self.model.default_recipe} is not one of the recipes "
                f"({', '.join(str(n) for n in sorted(self.recipes))})"
            )
        if not self.recipes and self.model.default_recipe != 0:
            raise ValueError("model.default_recipe needs a `recipes:` section")
        return self

    @model_validator(mode="after")
    def _trigger_needs_plc(self) -> AppConfig:
        if self.daemon.trigger == "plc" and self.plc.type == "none":
            raise ValueError("daemon.trigger plc needs a PLC: set plc.type, or trigger hardware/free_run")
        return self


# Sections a SIGHUP may change; any other change needs a restart.
RELOADABLE = ("thresholds", "logging", "archive", "recipes")


def config_hash(config: AppConfig) -> str:
    """Short stable hash of the effective configuration (recorded with every verdict)."""
    blob = json.dumps(config.model_dump(mode="json", by_alias=True), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
