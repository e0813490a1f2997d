"""Peak FLOP/s by exact device model, the trainer.peak_tflops override, and MFU where the peak is unknown."""

import pytest
import torch

from lsys.train.metrics import PEAK_BF16_FLOPS, device_model, device_peak_flops, format_record, mfu

# What torch.cuda.get_device_name() reports on each GPU, and the model it is.
REPORTED_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA GH200 144G HBM3e": "GH200",
    "NVIDIA B200": "B200",
    "NVIDIA A100-SXM4-80GB": "A100",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100",
    "NVIDIA A10": "A10",
    "NVIDIA L4": "L4",
    "NVIDIA L40": "L40",
    "NVIDIA L40S": "L40S",
}


@pytest.mark.parametrize("name, model", REPORTED_NAMES.items())
def test_each_reported_name_is_its_own_model(name: str, model: str):
    assert device_model(name) == model


def test_variants_that_share_a_name_prefix_get_their_own_peaks():
    peak = {name: PEAK_BF16_FLOPS[device_model(name)] for name in REPORTED_NAMES}
    assert peak["NVIDIA H100 80GB HBM3"] == 989.4e12 and peak["NVIDIA H100 PCIe"] == 756e12
    assert (peak["NVIDIA L4"], peak["NVIDIA L40"], peak["NVIDIA L40S"]) == (121e12, 181e12, 362e12)
    assert peak["NVIDIA A100-SXM4-40GB"] == peak["NVIDIA A100 80GB PCIe"] == 312e12
    assert peak["NVIDIA H200 NVL"] == 835e12 and peak["NVIDIA A10"] == 125e12


@pytest.mark.parametrize(
    "name",
    ["NVIDIA A10G", "NVIDIA H800", "NVIDIA A800-SXM4-80GB", "NVIDIA GeForce RTX 4090", "NVIDIA L40G", "Tesla T4", ""],
)
def test_an_unlisted_device_has_no_model(name: str):
    assert device_model(name) is None


def test_peak_is_unknown_on_cpu_unless_given():
    cpu = torch.device("cpu")
    assert device_peak_flops(cpu) is None
    assert device_peak_flops(cpu, peak_tflops=400.0) == 400e12


def test_peak_tflops_overrides_the_table(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    gpu = torch.device("cuda", 0)
    assert device_peak_flops(gpu) == 756e12
    assert device_peak_flops(gpu, peak_tflops=600.0) == 600e12


def test_peak_tflops_must_be_positive():
    with pytest.raises(ValueError, match="trainer.peak_tflops must be positive, got 0"):
        device_peak_flops(torch.device("cpu"), peak_tflops=0.0)


def test_mfu_without_a_peak_is_left_out_of_the_record_and_the_line():
    assert mfu(1000.0, 6e9, 1e15) == pytest.approx(6e-3)
    assert mfu(1000.0, 6e9, None) is None
    record = {"step": 10, "loss": 2.5, "mfu": mfu(1000.0, 6e9, None)}
    assert format_record(record) == "step 10 | loss 2.5000"
    assert "mfu 0.6%" in format_record({**record, "mfu": mfu(1000.0, 6e9, 1e15)})
