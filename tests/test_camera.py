"""Cameras: pixel formats, the simulated camera, and Harvesters with the real viky.cti producer."""

from __future__ import annotations

import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from anomalyd.config import Roi
from anomalyd.drivers.camera.base import CameraError, CameraTimeout
from anomalyd.drivers.camera.harvesters import HarvestersCamera, HarvestersCameraConfig
from anomalyd.drivers.camera.pixel_formats import UnsupportedPixelFormat, to_rgb
from anomalyd.drivers.camera.simulated import CameraFaults, SimulatedCamera, SimulatedCameraConfig


# ------------------------------------------------------------------ pixel formats
def _reference(h: int = 6, w: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_bgr_rgba() -> None:
    rgb = _reference()
    assert np.array_equal(to_rgb(rgb.ravel(), 8, 6, "RGB8"), rgb)
    assert np.array_equal(to_rgb(rgb[..., ::-1].copy().ravel(), 8, 6, "BGR8"), rgb)
    rgba = np.dstack([rgb, np.full((6, 8), 255, np.uint8)])
    assert np.array_equal(to_rgb(rgba.ravel(), 8, 6, "RGBa8"), rgb)


def test_mono_formats() -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    assert np.array_equal(to_rgb(gray.ravel(), 8, 6, "Mono8")[..., 1], gray)
    mono12 = gray.astype("<u2") << 4
    assert np.array_equal(to_rgb(mono12.view(np.uint8).ravel(), 8, 6, "Mono12")[..., 0], gray)
    mono10 = gray.astype("<u2") << 2
    assert np.array_equal(to_rgb(mono10.view(np.uint8).ravel(), 8, 6, "Mono10")[..., 2], gray)


def test_packed_mono() -> None:
    gray = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    p = gray.astype(np.uint32).ravel() << 4  # 12-bit values
    packed = np.empty(len(p) // 2 * 3, np.uint8)
    packed[0::3] = p[0::2] & 0xFF
    packed[1::3] = ((p[0::2] >> 8) & 0x0F) | ((p[1::2] & 0x0F) << 4)
    packed[2::3] = p[1::2] >> 4
    assert np.array_equal(to_rgb(packed, 8, 6, "Mono12p")[..., 0], gray)
    p10 = gray.astype(np.uint64).ravel() << 2  # 10-bit values, 4 per 5 bytes, LSB first
    groups = p10.reshape(-1, 4)
    word = groups[:, 0] | (groups[:, 1] << 10) | (groups[:, 2] << 20) | (groups[:, 3] << 30)
    packed10 = np.stack([(word >> (8 * i)) & 0xFF for i in range(5)], axis=1).astype(np.uint8).ravel()
    assert np.array_equal(to_rgb(packed10, 8, 6, "Mono10p")[..., 0], gray)


@pytest.mark.parametrize(
    "fmt,offsets",
    [
        ("BayerRG8", {(0, 0): 0, (0, 1): 1, (1, 0): 1, (1, 1): 2}),
        ("BayerGB8", {(0, 0): 1, (0, 1): 2, (1, 0): 0, (1, 1): 1}),
        ("BayerGR8", {(0, 0): 1, (0, 1): 0, (1, 0): 2, (1, 1): 1}),
        ("BayerBG8", {(0, 0): 2, (0, 1): 1, (1, 0): 1, (1, 1): 0}),
    ],
)
def test_bayer_patterns(fmt: str, offsets: dict[tuple[int, int], int]) -> None:
    """A flat colour mosaicked with the named pattern comes back as that colour."""
    colour = np.array([200, 100, 30], np.uint8)
    h, w = 16, 16
    mosaic = np.zeros((h, w), np.uint8)
    for (dy, dx), channel in offsets.items():
        mosaic[dy::2, dx::2] = colour[channel]
    rgb = to_rgb(mosaic.ravel(), w, h, fmt)
    assert np.abs(rgb[4:-4, 4:-4].astype(int) - colour).max() <= 2


def test_unsupported_format_is_a_clear_error() -> None:
    with pytest.raises(UnsupportedPixelFormat, match="'YUV422_8' is not supported; use one of Mono8"):
        to_rgb(np.zeros(10, np.uint8), 2, 2, "YUV422_8")


# ------------------------------------------------------------------ simulated camera
def test_simulated_camera_is_deterministic_and_reports_its_source(sample_dir: Path) -> None:
    def run() -> list[str]:
        cam = SimulatedCamera(SimulatedCameraConfig(source=sample_dir, order="shuffle", seed=4))
        cam.open()
        out = []
        for _ in range(6):
            cam.software_trigger()
            frame = cam.grab(1.0)
            assert frame.image.dtype == np.uint8 and frame.image.shape[2] == 3
            out.append(str(frame.source))
        cam.close()
        return out

    first = run()
    assert first == run()
    assert all("/test/" in s for s in first)


def test_simulated_faults(sample_dir: Path) -> None:
    faults = CameraFaults(timeout_every=3, wrong_size_every=4)
    cam = SimulatedCamera(SimulatedCameraConfig(source=sample_dir, faults=faults, sensor_size=(200, 100)))
    cam.open()
    outcomes = []
    for _ in range(8):
        try:
            outcomes.append(cam.grab(0.01).image.shape)
        except CameraTimeout:
            outcomes.append("timeout")
    assert outcomes[2] == "timeout" and outcomes[5] == "timeout"
    assert outcomes[3] == (50, 100, 3) and outcomes[0] == (100, 200, 3)


def test_simulated_frame_rate_and_roi_check(sample_dir: Path) -> None:
    cam = SimulatedCamera(SimulatedCameraConfig(source=sample_dir, fps=50))
    cam.open()
    t0 = time.monotonic()
    ids = [cam.grab(1.0).frame_id for _ in range(6)]
    assert ids == sorted(ids) and time.monotonic() - t0 >= 0.09
    bad = SimulatedCamera(SimulatedCameraConfig(source=sample_dir, roi=Roi(x=200, y=0, width=100, height=10)))
    with pytest.raises(CameraError, match="does not fit the 256x256 sensor"):
        bad.open()


# ------------------------------------------------------------------ Harvesters + viky.cti
def viky() -> Path:
    import genicam

    path = Path(genicam.__file__).parent / "viky.cti"
    assert path.is_file(), "the genicam wheel ships viky.cti"
    return path


@pytest.mark.e2e
def test_harvesters_open_by_serial_grab_and_reopen() -> None:
    config = HarvestersCameraConfig(
        cti=[viky()], serial_number="1", nodes={"Width": 320, "Height": 240, "PixelFormat": "Mono8"}
    )
    cam = HarvestersCamera(config)
    cam.open()
    try:
        assert cam.read_node("Width") == 320 and cam.read_node("PixelFormat") == "Mono8"
        frames = [cam.grab(3.0) for _ in range(3)]
        assert [f.image.shape for f in frames] == [(240, 320, 3)] * 3
        ids = [f.frame_id for f in frames]
        assert ids == sorted(ids) and len(set(ids)) == 3
    finally:
        cam.close()
    again = HarvestersCamera(HarvestersCameraConfig(cti=[viky()], serial_number="1"))
    again.open()  # close released the device
    try:
        assert again.grab(3.0).image.shape[2] == 3
    finally:
        again.close()


@pytest.mark.e2e
def test_harvesters_rgba_frames_convert(tmp_path: Path) -> None:
    cam = HarvestersCamera(HarvestersCameraConfig(cti=[viky()], serial_number="0"))
    cam.open()
    try:
        frame = cam.grab(3.0)
        assert frame.image.shape == (400, 400, 3) and cam.pixel_format == "RGBa8"
        cv2.imwrite(str(tmp_path / "viky.png"), frame.image)
    finally:
        cam.close()


@pytest.mark.e2e
def test_harvesters_bad_node_values_are_clear_errors() -> None:
    with pytest.raises(CameraError, match=r"PixelFormat = 'BayerRG8' not accepted; allowed: RGBa8, Mono8"):
        HarvestersCamera(HarvestersCameraConfig(cti=[viky()], nodes={"PixelFormat": "BayerRG8"})).open()
    with pytest.raises(CameraError, match="has no GenICam node 'ExposureTimeAbs'"):
        HarvestersCamera(HarvestersCameraConfig(cti=[viky()], nodes={"ExposureTimeAbs": 100})).open()
    with pytest.raises(CameraError, match="no camera matches"):
        HarvestersCamera(HarvestersCameraConfig(cti=[viky()], serial_number="nope")).open()
    with pytest.raises(CameraError, match="GenTL producer not found"):
        HarvestersCamera(HarvestersCameraConfig(cti=[Path("/nonexistent.cti")])).open()


@pytest.mark.e2e
def test_harvesters_timeout_raises_camera_timeout() -> None:
    cam = HarvestersCamera(HarvestersCameraConfig(cti=[viky()], nodes={"AcquisitionFrameRate": 1.0}))
    cam.open()
    try:
        cam.grab(3.0)  # the first frame
        with pytest.raises(CameraTimeout):
            cam.grab(0.05)
    finally:
        cam.close()


@pytest.mark.e2e
def test_harvesters_buffers_are_requeued() -> None:
    """Many more frames than buffers: only possible if every buffer goes back to the queue."""
    cam = HarvestersCamera(
        HarvestersCameraConfig(cti=[viky()], nodes={"Width": 100, "Height": 100, "AcquisitionFrameRate": 100.0})
    )
    cam.open()
    try:
        ids = [cam.grab(3.0).frame_id for _ in range(60)]
        assert len(set(ids)) == 60
    finally:
        cam.close()


def test_a_lost_camera_is_reopened_after_reopen_backoff_s_doubling(tmp_path: Path) -> None:
    """camera.reopen_backoff_s is the first wait; each failed reopen doubles it up to 10 s (a stand-in camera)."""
    from anomalyd.daemon.camera_supervisor import CameraSupervisor
    from anomalyd.daemon.handshake import Handshake
    from anomalyd.daemon.metrics import Metrics
    from anomalyd.drivers.camera.base import CameraDisconnected
    from anomalyd.drivers.camera.harvesters import HarvestersCameraConfig

    attempts: list[float] = []
    clock = [0.0]

    class Unplugged:
        name = "unplugged"

        def open(self) -> None:
            attempts.append(clock[0])
            raise CameraDisconnected("no device")

        def close(self) -> None:
            pass

    config = HarvestersCameraConfig(cti=[tmp_path / "producer.cti"], reopen_backoff_s=3.0)
    supervisor = CameraSupervisor(config, Handshake(), Metrics(), camera=Unplugged())  # type: ignore[arg-type]
    supervisor._opened_once = True  # it had been open: a lost camera, not refused settings at start
    for step in range(0, 400):
        clock[0] = step / 10
        assert not supervisor.ensure_open(now=clock[0])
    assert attempts == [0.0, 3.0, 9.0, 19.0, 29.0, 39.0], attempts  # waits 3, 6, then 10 (the cap)
