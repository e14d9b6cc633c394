"""One device parser for ``--device``, ``resolve_device`` and the search backend's choice."""

import pytest
import torch

from alfk_cli.errors import AlfkError
from alfk_cli.search.exact import CPU_BACKEND, search_backend
from alfk_cli.util.devices import parse_device, resolve_device


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("auto", "auto"),
        ("cpu", "cpu"),
        ("cuda", "cuda"),
        ("cuda:0", "cuda:0"),
        ("cuda:3", "cuda:3"),
        ("CPU", "cpu"),
        ("Auto", "auto"),
        ("CUDA:1", "cuda:1"),
        ("cuda:01", "cuda:1"),
    ],
)
def test_parse_device_accepts_and_normalises(name, expected):
    assert parse_device(name) == expected


REJECTED = ["", "gpu", "gpu0", "cuda:", "cuda:-1", "cuda:a", "cpu:0", "auto:1", " cpu", "cuda 0"]
REJECTED += ["mps", "cuda:\u0661"]  # an Arabic-Indic digit one


@pytest.mark.parametrize("name", REJECTED)
def test_parse_device_rejects_other_spellings(name):
    with pytest.raises(AlfkError, match=r"unknown device .*; use auto, cpu, cuda or cuda:N"):
        parse_device(name)


def test_resolve_device_uses_the_parser():
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device() == resolve_device("auto")
    with pytest.raises(AlfkError, match="unknown device 'gpu'"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_cuda_device(name):
    with pytest.raises(AlfkError, match="no CUDA device is available") as resolved:
        resolve_device(name)
    with pytest.raises(AlfkError, match="no CUDA device is available") as searched:
        search_backend(name)
    assert str(searched.value) == str(resolved.value)
    assert "--device" not in str(resolved.value)  # the library does not name CLI flags
    assert search_backend("auto") == search_backend("cpu") == CPU_BACKEND


def test_cuda_index_beyond_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(AlfkError, match="only 1 CUDA device"):
        resolve_device("cuda:1")


def test_search_backend_rejects_unknown_devices():
    with pytest.raises(AlfkError, match="unknown device 'gpu0'"):
        search_backend("gpu0")


def test_cli_normalises_and_rejects_devices(cli, tmp_path):
    r = cli("pretrain", "--images", tmp_path, "--out", tmp_path / "x.pt", "--device", "cuda:x")
    assert r.exit_code == 2 and "use auto, cpu, cuda or cuda:N" in r.stderr
