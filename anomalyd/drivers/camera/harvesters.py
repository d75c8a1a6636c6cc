"""GenICam cameras (GigE Vision, USB3 Vision) through Harvesters and a vendor's GenTL producer."""

from __future__ import annotations

import glob
import os
import time
from typing import Any, Literal

from anomalyd.drivers.camera.base import (
    CameraDisconnected,
    CameraError,
    CameraSettings,
    CameraTimeout,
    Frame,
    check_roi,
    register_camera,
)
from anomalyd.drivers.camera.pixel_formats import CONVERTERS, to_rgb
from anomalyd.settings import ConfigPath, Roi, setting


class HarvestersCameraConfig(CameraSettings):
    type: Literal["harvesters"] = "harvesters"
    cti: list[ConfigPath] = setting(
        [], "GenTL producers", "Paths of .cti files (empty: those in GENICAM_GENTL64_PATH)."
    )
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


def producer_paths(configured: list[Any]) -> list[str]:
    """The .cti files to load: as configured, else every one in GENICAM_GENTL64_PATH."""
    if configured:
        missing = [str(p) for p in configured if not os.path.isfile(p)]
        if missing:
            raise CameraError(f"GenTL producer not found: {', '.join(missing)}")
        return [str(p) for p in configured]
    found: list[str] = []
    for folder in os.environ.get("GENICAM_GENTL64_PATH", "").split(os.pathsep):
        if folder:
            found += sorted(glob.glob(os.path.join(folder, "*.cti")))
    if not found:
        raise CameraError("no GenTL producer: set camera.cti or GENICAM_GENTL64_PATH to the vendor's .cti")
    return found


def _timestamp_ns(buffer: Any) -> int:
    """The device's timestamp where the producer has one, else the host's arrival time."""
    try:
        return int(buffer.timestamp_ns) or time.time_ns()
    except Exception:  # GenTL raises when the device has no timestamps (e.g. viky)
        return time.time_ns()


@register_camera(HarvestersCameraConfig)
class HarvestersCamera:
    def __init__(self, config: HarvestersCameraConfig) -> None:
        self.config = config
        self.name = "harvesters"
        self._harvester: Any = None
        self._acquirer: Any = None
        self.pixel_format = ""
        self.width = self.height = 0
        self._has_software_trigger = False

    # ------------------------------------------------------------ open / close
    def _selector(self) -> dict[str, str]:
        c = self.config
        wanted = {"serial_number": c.serial_number, "model": c.model, "user_defined_name": c.user_defined_name}
        return {k: v for k, v in wanted.items() if v is not None}

    def open(self) -> None:
        from harvesters.core import Harvester

        harvester = Harvester()
        try:
            for path in producer_paths(self.config.cti):
                harvester.add_file(path, check_existence=True)
            harvester.update()
            selector = self._selector()
            matches = [d for d in harvester.device_info_list if all(getattr(d, k) == v for k, v in selector.items())]
            if len(matches) <= self.config.index:
                seen = ", ".join(f"{d.model} serial {d.serial_number}" for d in harvester.device_info_list) or "none"
                raise CameraDisconnected(
                    f"no camera matches {selector or 'any'} index {self.config.index}; seen: {seen}"
                )
            info = matches[self.config.index]
            self.name = f"{info.model} #{info.serial_number}"
            self._acquirer = harvester.create({"serial_number": info.serial_number, "id_": info.id_})
            self._harvester = harvester
            self._apply_nodes()
            self.start()
        except Exception:
            self.close(harvester)
            raise

    def _apply_nodes(self) -> None:
        node_map = self._acquirer.remote_device.node_map
        for name, value in self.config.nodes.items():
            try:
                node = getattr(node_map, name)
            except AttributeError:
                raise CameraError(f"camera {self.name} has no GenICam node {name!r}") from None
            symbolics = getattr(node, "symbolics", None)
            if symbolics is not None and str(value) not in symbolics:
                raise CameraError(f"{name} = {value!r} not accepted; allowed: {', '.join(symbolics)}")
            try:
                node.value = value
            except Exception as exc:  # genicam raises its own types (OutOfRange, AccessException, …)
                limits = ""
                if hasattr(node, "min") and hasattr(node, "max"):
                    limits = f"; allowed {node.min} … {node.max}"
                raise CameraError(f"{name} = {value!r} not accepted by {self.name} ({exc}){limits}") from None
        self.pixel_format = str(node_map.PixelFormat.value)
        if self.pixel_format not in CONVERTERS:
            raise CameraError(
                f"{self.name} delivers {self.pixel_format}, which anomalyd cannot convert; set nodes.PixelFormat "
                f"to one of {', '.join(f for f in node_map.PixelFormat.symbolics if f in CONVERTERS)}"
            )
        self.width, self.height = int(node_map.Width.value), int(node_map.Height.value)
        check_roi(self.config.roi, self.width, self.height)
        self._has_software_trigger = hasattr(node_map, "TriggerSoftware")

    def read_node(self, name: str) -> Any:
        """Current value of a node (for commissioning and tests)."""
        return getattr(self._acquirer.remote_device.node_map, name).value

    def start(self) -> None:
        self._acquirer.start()

    def close(self, harvester: Any = None) -> None:
        acquirer, self._acquirer = self._acquirer, None
        harvester = harvester or self._harvester
        self._harvester = None
        if acquirer is not None:
            try:
                acquirer.stop()
            finally:
                acquirer.destroy()
        if harvester is not None:
            harvester.reset()

    # ------------------------------------------------------------ frames
    def software_trigger(self) -> None:
        """Fire the camera's software trigger; on a free-running camera, drop queued frames instead."""
        if self._acquirer is None:
            raise CameraDisconnected(f"{self.name} is closed")
        if self._has_software_trigger:
            self._acquirer.remote_device.node_map.TriggerSoftware.execute()
            return
        # Free run: make the next grab return a frame taken after this moment.
        while (buffer := self._acquirer.try_fetch(timeout=0.0001)) is not None:
            buffer.queue()

    def grab(self, timeout_s: float) -> Frame:
        from genicam.gentl import TimeoutException

        if self._acquirer is None:
            raise CameraDisconnected(f"{self.name} is closed")
        try:
            with self._acquirer.fetch(timeout=timeout_s) as buffer:  # re-queues the buffer on exit
                component = buffer.payload.components[0]
                image = to_rgb(component.data, component.width, component.height, self.pixel_format)
                frame_id = int(buffer.frame_id)
                stamp = _timestamp_ns(buffer)
        except TimeoutException:
            raise CameraTimeout(f"{self.name}: no frame within {timeout_s * 1000:.0f} ms") from None
        except CameraError:
            raise
        except Exception as exc:  # a lost device shows up as any of several GenTL errors
            raise CameraDisconnected(f"{self.name}: {exc}") from exc
        return Frame(image, frame_id, stamp)
