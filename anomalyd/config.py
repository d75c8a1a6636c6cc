"""The YAML configuration: schema, loader, and errors that name file, line and key.

Every field carries a title, description, unit (where it has one) and bounds, so
the schema documents itself (``anomalyd check-config --schema``). Backend
sections are unions discriminated by ``type``; each backend's settings class
lives here so that validating a file imports nothing heavy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from anomalyd.drivers.plc.layout import CommandLayout, StatusLayout, misaligned_32bit


def setting(default: Any, title: str, description: str, unit: str | None = None, **bounds: Any) -> Any:
    """A documented field: title, description, unit and bounds in one place."""
    extra: dict[str, Any] | None = {"unit": unit} if unit else None
    return Field(default, title=title, description=description, json_schema_extra=extra, **bounds)


class Section(BaseModel):
    """Base of every section: unknown keys are errors, not silently ignored."""

    # allow_inf_nan=False: `.inf` or `.nan` is never a threshold, a budget or a timeout.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ---------------------------------------------------------------- camera
class Roi(Section):
    x: int = setting(0, "ROI left", "Left edge of the crop in sensor pixels.", "px", ge=0, le=65535)
    y: int = setting(0, "ROI top", "Top edge of the crop in sensor pixels.", "px", ge=0, le=65535)
    width: int = setting(..., "ROI width", "Width of the crop in sensor pixels.", "px", gt=0, le=65535)
    height: int = setting(..., "ROI height", "Height of the crop in sensor pixels.", "px", gt=0, le=65535)


class CameraFaults(Section):
    timeout_every: int = setting(
        0, "Timeout every N", "Simulate a grab timeout every N frames (0: never).", ge=0, le=1_000_000_000
    )
    drop_every: int = setting(
        0, "Drop every N", "Silently skip a frame every N frames (0: never).", ge=0, le=1_000_000_000
    )
    wrong_size_every: int = setting(
        0, "Wrong size every N", "Deliver a half-size frame every N (0: never).", ge=0, le=1_000_000_000
    )
    hang_every: int = setting(
        0, "Hang every N", "Every N frames the driver hangs for hang_ms, ignoring the timeout (0: never).", ge=0
    )
    lamp_after: int = setting(
        0,
        "Lamp change after N",
        "After N frames every frame is scaled by lamp_gain (0: never).",
        ge=0,
        le=1_000_000_000,
    )
    lamp_gain: float = setting(
        1.5, "Lamp gain", "Brightness factor after lamp_after (a new, brighter lamp).", gt=0, le=4
    )
    hang_ms: float = setting(300.0, "Hang", "How long a hanging grab blocks before it delivers.", "ms", ge=0, le=60000)


class SimulatedCameraConfig(Section):
    type: Literal["simulated"] = "simulated"
    source: Path = setting(
        Path("sample"), "Image source", "Folder of images or an MVTec-layout data set (test/* is replayed)."
    )
    order: Literal["sequential", "shuffle"] = setting("sequential", "Order", "Replay order of the images.")
    seed: int = setting(0, "Shuffle seed", "Seed of the shuffled order.", ge=0, le=2**32 - 1)
    fps: float = setting(0.0, "Frame rate", "Frames per second in free run (0: as fast as asked).", "Hz", ge=0, le=1000)
    sensor_size: tuple[int, int] | None = setting(
        None, "Sensor size", "Resize every image to [width, height] as a real sensor would deliver.", "px"
    )
    faults: CameraFaults = setting(CameraFaults(), "Fault injection", "Simulated faults for drills and tests.")
    roi: Roi | None = setting(None, "Region of interest", "Crop applied before the model.")


class HarvestersCameraConfig(Section):
    type: Literal["harvesters"] = "harvesters"
    cti: list[Path] = setting([], "GenTL producers", "Paths of .cti files (empty: those in GENICAM_GENTL64_PATH).")
    serial_number: str | None = setting(None, "Serial number", "Select the device with this serial number.")
    model: str | None = setting(None, "Model", "Select the device of this model.")
    user_defined_name: str | None = setting(None, "User-defined name", "Select the device with this name.")
    index: int = setting(0, "Index", "Among the devices that match, take this one.", ge=0, le=255)
    nodes: dict[str, str | int | float | bool] = setting(
        {}, "GenICam nodes", "Node values applied at open, in order (ExposureTime, Gain, PixelFormat, …)."
    )
    reopen_backoff_s: float = setting(
        1.0, "Reopen back-off", "First wait before reopening a lost device.", "s", gt=0, le=600
    )
    roi: Roi | None = setting(None, "Region of interest", "Crop applied before the model.")


CameraConfig = Annotated[SimulatedCameraConfig | HarvestersCameraConfig, Field(discriminator="type")]


# ---------------------------------------------------------------- PLC
def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8, ::1: addresses no other machine can reach."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Half-open ranges [start, end) share an element."""
    return a[0] < b[1] and b[0] < a[1]


class _PlcCommon(Section):
    status_layout: StatusLayout = setting(StatusLayout(), "Status block", "Byte offsets of the daemon-owned block.")
    command_layout: CommandLayout = setting(CommandLayout(), "Command block", "Bit offsets of the PLC-owned block.")
    timeout_s: float = setting(1.0, "I/O timeout", "Timeout of one request to the PLC.", "s", gt=0, le=30)
    reconnect_max_s: float = setting(
        5.0, "Reconnect back-off cap", "Longest wait between reconnects.", "s", gt=0, le=600
    )


class S7Config(_PlcCommon):
    type: Literal["s7"] = "s7"
    host: str = setting("127.0.0.1", "PLC address", "IP address or host name of the S7 CPU.")
    port: int = setting(102, "TCP port", "ISO-on-TCP port (102 on a real PLC).", ge=1, le=65535)
    rack: int = setting(0, "Rack", "Rack of the CPU.", ge=0, le=7)
    slot: int = setting(1, "Slot", "Slot of the CPU (1 for S7-1200/1500).", ge=0, le=31)
    status_db: int = setting(100, "Status DB", "DB number of the daemon-owned status block.", ge=1, le=65535)
    status_start: int = setting(0, "Status start", "Byte offset of the status block in its DB.", ge=0, le=65000)
    command_db: int = setting(101, "Command DB", "DB number of the PLC-owned command block.", ge=1, le=65535)
    command_start: int = setting(0, "Command start", "Byte offset of the command block in its DB.", ge=0, le=65000)

    @model_validator(mode="after")
    def _blocks_apart(self) -> S7Config:
        for name, start in (("status_start", self.status_start), ("command_start", self.command_start)):
            if start % 2:
                raise ValueError(f"{name} {start} must be even (an S7 structure starts on an even byte)")
        # One DB for both blocks is allowed, but our score bytes must never land on the PLC's command byte.
        if self.status_db == self.command_db:
            status = (self.status_start, self.status_start + self.status_layout.size())
            command = (self.command_start, self.command_start + self.command_layout.size())
            if _overlap(status, command):
                raise ValueError(
                    f"status block (DB{self.status_db} bytes {status[0]}..{status[1] - 1}) overlaps the command block "
                    f"(bytes {command[0]}..{command[1] - 1}) in the same DB; move status_start or command_start"
                )
        return self


class ModbusConfig(_PlcCommon):
    type: Literal["modbus"] = "modbus"
    host: str = setting("127.0.0.1", "Server address", "IP address of the Modbus TCP server (the PLC).")
    port: int = setting(502, "TCP port", "Modbus TCP port.", ge=1, le=65535)
    unit: int = setting(1, "Unit id", "Modbus unit/device id.", ge=0, le=255)
    status_register: int = setting(0, "Status register", "First holding register of the status block.", ge=0, le=65000)
    command_register: int = setting(
        100, "Command register", "First holding register of the command block.", ge=0, le=65000
    )
    word_order: Literal["big", "little"] = setting(
        "big", "Word order", "Order of the two registers of a 32-bit value (big: high word first)."
    )
    align_32bit: bool = setting(
        False,
        "Align 32-bit values",
        "Every 32-bit value at an even register (PLCs such as Modicon need it): the aligned default layouts "
        "(latency_ms at register 18, command part_id at register 2); layouts given here are checked instead.",
    )

    @model_validator(mode="before")
    @classmethod
    def _aligned_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("align_32bit") is True:
            data = dict(data)
            data.setdefault("status_layout", StatusLayout.aligned())
            data.setdefault("command_layout", CommandLayout.aligned())
        return data

    def misaligned_32bit(self) -> list[str]:
        """Both blocks' 32-bit values that start at an odd register: 'name (register N)'."""
        return misaligned_32bit(self.status_layout, self.status_register) + misaligned_32bit(
            self.command_layout, self.command_register
        )

    @model_validator(mode="after")
    def _blocks_apart(self) -> ModbusConfig:
        if self.align_32bit:
            odd = self.misaligned_32bit()
            if odd:
                raise ValueError(
                    "align_32bit: 32-bit values at odd registers: " + ", ".join(odd) + "; put them at byte offsets "
                    "divisible by 4 and start the blocks at even registers"
                )
        status = (self.status_register, self.status_register + self.status_layout.size() // 2)
        command = (self.command_register, self.command_register + self.command_layout.size() // 2)
        if _overlap(status, command):
            raise ValueError(
                f"status registers {status[0]}..{status[1] - 1} overlap the command registers "
                f"{command[0]}..{command[1] - 1}; move status_register or command_register"
            )
        if max(status[1], command[1]) > 65536:
            raise ValueError("the blocks must end at or before register 65535")
        return self


def _refuse_keys(data: Any, refused: dict[str, str]) -> Any:
    """Settings a backend inherits but cannot honour: an error that says what to do, never silently ignored."""
    if isinstance(data, dict):
        for key, why in refused.items():
            if key in data:
                raise ValueError(f"{key}: {why}; remove the key")
    return data


class ModbusServerConfig(ModbusConfig):
    type: Literal["modbus-server"] = "modbus-server"  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _unused(cls, data: Any) -> Any:
        return _refuse_keys(
            data,
            {
                "unit": "a modbus-server answers requests for any unit id",
                "timeout_s": "a modbus-server waits for no one (a silent client is dropped after idle_timeout_s)",
            },
        )

    host: str = setting("127.0.0.1", "Listen address", "Address the daemon serves registers on.")
    port: int = setting(5020, "TCP port", "Port the daemon serves registers on.", ge=1, le=65535)
    max_clients: int = setting(
        4, "Most clients", "Connections served at once; more are refused (a PLC needs one).", ge=1, le=64
    )
    idle_timeout_s: float = setting(
        60.0, "Idle timeout", "A client that sends nothing for this long is disconnected.", "s", gt=0, le=3600
    )
    client_timeout_heartbeats: int = setting(
        10,
        "Client timeout",
        "plc_connected and /healthz say no PLC when no client has read the status for this many heartbeats.",
        ge=1,
        le=100_000,
    )


class OpcUaServerConfig(_PlcCommon):
    """The daemon serves the blocks over OPC UA (for PLCs and SCADA that may not use S7 PUT/GET)."""

    type: Literal["opcua-server"] = "opcua-server"

    @model_validator(mode="before")
    @classmethod
    def _unused(cls, data: Any) -> Any:
        return _refuse_keys(
            data, {"command_layout": "OPC UA clients write the Command nodes, not a block (docs/plc.md, OPC UA)"}
        )

    host: str = setting("127.0.0.1", "Listen address", "Loopback by default; elsewhere security is required.")
    port: int = setting(4840, "TCP port", "OPC UA port (4840 is the registered one).", ge=1, le=65535)
    security: Literal["none", "sign", "sign_and_encrypt"] = setting(
        "none", "Security", "Basic256Sha256 Sign or SignAndEncrypt; none only on loopback (or allow_insecure_remote)."
    )
    certificate: Path | None = setting(None, "Server certificate", "DER or PEM file (anomalyd opcua-cert makes one).")
    private_key: Path | None = setting(None, "Server private key", "PEM file of the server certificate's key.")
    trusted_clients: Path | None = setting(
        None, "Trusted clients", "Folder (or file) of client certificates allowed to connect (PLC, SCADA)."
    )
    username: str | None = setting(None, "User name", "Optional user name clients must log in with.")
    password_file: Path | None = setting(None, "Password file", "File holding that user's password.")
    client_timeout_heartbeats: int = setting(
        10,
        "Client timeout",
        "plc_connected and /healthz say no PLC when no client has read the status for this many heartbeats.",
        ge=1,
        le=100_000,
    )
    max_clients: int = setting(
        8, "Most clients", "Connections served at once; more are refused (a PLC and a SCADA need two).", ge=1, le=256
    )
    allow_insecure_remote: bool = setting(
        False, "Allow insecure remote", "Serve without security beyond loopback (an isolated machine network only)."
    )

    @model_validator(mode="after")
    def _secure_beyond_loopback(self) -> OpcUaServerConfig:
        if not is_loopback(self.host) and self.security == "none" and not self.allow_insecure_remote:
            raise ValueError(
                f"host {self.host} is not loopback and security is none: set security sign_and_encrypt with "
                "certificate, private_key and trusted_clients (or allow_insecure_remote: true, not recommended)"
            )
        if self.security != "none" and not (self.certificate and self.private_key and self.trusted_clients):
            raise ValueError(f"security {self.security} needs certificate, private_key and trusted_clients")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


class NoPlcConfig(Section):
    type: Literal["none"] = "none"


PlcConfig = Annotated[
    S7Config | ModbusConfig | ModbusServerConfig | OpcUaServerConfig | NoPlcConfig, Field(discriminator="type")
]


# ---------------------------------------------------------------- model, engine
class ModelConfig(Section):
    bundle: Path = setting(
        Path("bundle"), "Model bundle", "Folder written by `anomalyd fit` (recipe 0 when there are no recipes)."
    )
    default_recipe: int = setting(
        0,
        "Default recipe",
        "Recipe used while the PLC's recipe_request is 0 (with recipes: one of them).",
        ge=0,
        le=65535,
    )
    trusted_keys: list[Path] = setting(
        [],
        "Trusted signing keys",
        "Ed25519 public keys (signing.pub from `anomalyd keygen`); when set, a bundle not signed by one of "
        "them is refused (empty: bundles are not authenticated).",
    )


class _EngineCommon(Section):
    threads: int = setting(0, "CPU threads", "Threads for CPU work (0: all cores).", ge=0, le=256)


class AutoEngineConfig(_EngineCommon):
    type: Literal["auto"] = "auto"


class TorchEngineConfig(_EngineCommon):
    type: Literal["torch"] = "torch"
    device: str = setting("auto", "Device", "torch device: auto (cuda if present), cpu, cuda, cuda:1.")
    fp16: bool = setting(True, "FP16", "Half precision on CUDA (ignored on the CPU).")
    channels_last: bool = setting(True, "Channels last", "NHWC memory layout on CUDA (faster convolutions).")
    cuda_graph: bool = setting(False, "CUDA graph", "Capture the extractor as a CUDA graph (fixed batch of 1).")


class OnnxRuntimeEngineConfig(_EngineCommon):
    type: Literal["onnxruntime"] = "onnxruntime"
    providers: list[str] = setting(
        ["CPUExecutionProvider"], "Execution providers", "ONNX Runtime providers in order of preference."
    )


class TensorRtEngineConfig(_EngineCommon):
    type: Literal["tensorrt"] = "tensorrt"
    device: str = setting("cuda", "Device", "CUDA device, e.g. cuda or cuda:1.")
    fp16: bool = setting(True, "FP16", "Build the plan in FP16 where the GPU has fast FP16.")
    workspace_mb: int = setting(1024, "Workspace", "Builder workspace limit.", "MiB", ge=16, le=1_000_000)


EngineConfig = Annotated[
    AutoEngineConfig | TorchEngineConfig | OnnxRuntimeEngineConfig | TensorRtEngineConfig,
    Field(discriminator="type"),
]


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
    data_dir: Path = setting(Path("var"), "Data folder", "Records database and reject archive go here.")
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
    token_file: Path | None = setting(
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
    ca_file: Path | None = setting(None, "CA file", "CA certificate(s) the broker's certificate must chain to.")
    cert_file: Path | None = setting(None, "Client certificate", "Client certificate for mutual TLS.")
    key_file: Path | None = setting(None, "Client key", "Key of the client certificate.")
    username: str = setting("", "User", "User name for the broker ('': none).")
    password_file: Path | None = setting(
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
    bundle: Path = setting(..., "Bundle", "Folder written by `anomalyd fit` for this variant.")
    thresholds: ThresholdsConfig | None = setting(None, "Thresholds", "This recipe's rules (empty: `thresholds`).")
    roi: Roi | None = setting(None, "Region of interest", "This recipe's crop (empty: `camera.roi`).")


class AppConfig(Section):
    """The whole configuration file."""

    camera: CameraConfig = setting(SimulatedCameraConfig(), "Camera", "Where frames come from.")
    plc: PlcConfig = setting(S7Config(), "PLC", "Where verdicts go.")
    model: ModelConfig = setting(ModelConfig(), "Model", "The model bundle.")
    engine: EngineConfig = setting(AutoEngineConfig(), "Engine", "What runs the feature extractor.")
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
        if self.daemon.trigger == "plc" and isinstance(self.plc, NoPlcConfig):
            raise ValueError("daemon.trigger plc needs a PLC: set plc.type, or trigger hardware/free_run")
        return self


# Sections a SIGHUP may change; any other change needs a restart.
RELOADABLE = ("thresholds", "logging", "archive", "recipes")


def config_hash(config: AppConfig) -> str:
    """Short stable hash of the effective configuration (recorded with every verdict)."""
    blob = json.dumps(config.model_dump(mode="json", by_alias=True), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
